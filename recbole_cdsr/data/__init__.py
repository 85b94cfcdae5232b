from recbole_cdsr.data.dataset import CDSRDataset
from recbole_cdsr.data.utils import (
    CDSREvalDataLoader,
    cdsr_data_preparation,
    create_cdsr_dataset,
    ensure_atomic_files,
)
