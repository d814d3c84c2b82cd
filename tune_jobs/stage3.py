"""Stage 3 of the Ray Tune search — schedule x early-stopping patience x gradient accumulation, on stage 2's best.

Run it directly (joins a running cluster, else starts a local one), or submit it to a cluster:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 \
        --runtime-env tune_jobs/runtime_env.yaml -- python tune_jobs/stage3.py [options] [section.key=value ...]

Re-running the same command resumes the experiment; `python tune_jobs/stage3.py --help` lists the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted copy of rsilora

from rsilora.tune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("stage3"))
