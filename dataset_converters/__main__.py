"""``python -m dataset_converters RELEASE_DIR ...`` converts an LLMCDSR release folder;
``python -m dataset_converters interactions FILE ...`` converts any two-domain interaction log."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "interactions":
    from dataset_converters.interactions import main

    sys.exit(main(sys.argv[2:]))

from dataset_converters.llmcdsr_release import main  # noqa: E402

sys.exit(main())
