import sys

from dataset_converters.llmcdsr_release import main

sys.exit(main())
