#!/usr/bin/env bash
# The built-in mixnet_s.imagenette, all three stages in one command (docs/default-model.md): each stage
# resumes where it stopped and a finished stage is skipped, so after an interruption run it again.
# Run from the repository root; RUNS and DATA as in the stage scripts. About 6.4 h on 2 CPU cores.
set -euo pipefail
here="$(dirname "$0")"
RUNS=${RUNS:-runs}
done_stage() { [ -f "$RUNS/$1/final/model.safetensors" ]; }
done_stage imagenette-s-112 || bash "$here/stage1.sh"
done_stage imagenette-s-112-stage2 || bash "$here/stage2.sh"
bash "$here/stage3.sh"
