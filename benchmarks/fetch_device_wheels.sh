#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels that cirbench needs and the lent GPU machine's image lacks
# (it has torch, torchvision, numpy, pillow, pandas, safetensors, peft, pluggy, click, tqdm, timm, regex,
# huggingface_hub ...; it cannot reach any registry). Versions are the ones this checkout's .venv runs, so
# the GPU run uses the code that was tested here. The device call then names `.whl` in `carry`; the run
# script installs them (benchmarks/device_gpu_bench.sh).
#
#   bash benchmarks/fetch_device_wheels.sh            # open_clip and its few missing needs, pydantic (~6 MB)
#   WITH_FAISS=1 bash benchmarks/fetch_device_wheels.sh   # also faiss-cpu (~30 MB): the CPU faiss timings there
#   WITH_TORCHCODEC=0.16.0 bash benchmarks/fetch_device_wheels.sh   # also TorchCodec (env.decoder_ceilings_img_s
#       compares its GPU decoder with torchvision's; CIRBENCH_IMAGE_DECODER=torchcodec runs the goals with it).
#       Opt-in: its wheels are built for one torch release, which may not be the GPU image's
#   PYVER=3.11 bash benchmarks/fetch_device_wheels.sh     # for another Python (a local rehearsal)
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${PYVER:-3.12}"                       # the GPU image's python3
VENV_PY="${VENV_PY:-.venv/bin/python}"
NAMES=(open_clip_torch ftfy wcwidth pydantic pydantic_core annotated_types typing_inspection webdataset braceexpand)
[[ "${WITH_FAISS:-0}" == 1 ]] && NAMES+=(faiss-cpu)
specs=()
for name in "${NAMES[@]}"; do
  version=""
  if [[ -x "$VENV_PY" ]]; then
    version="$("$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)"
  fi
  specs+=("${name}${version:+==$version}")
done
[[ -n "${WITH_TORCHCODEC:-}" ]] && specs+=("torchcodec==${WITH_TORCHCODEC}")
rm -rf .whl && mkdir -p .whl
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${specs[@]}"
grep -qxF '/.whl/' .gitignore 2>/dev/null || grep -qxF '/.whl/' .git/info/exclude 2>/dev/null \
  || echo '/.whl/' >> .git/info/exclude
du -ch .whl/*.whl | tail -1
ls .whl
