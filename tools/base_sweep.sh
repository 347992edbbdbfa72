#!/usr/bin/env bash
# A base-model sweep for one GPU session (run from the repo root with sdlora importable):
#   DEV=cuda MIN=4.5 OUT=results bash tools/base_sweep.sh
# trains the VAE once, then three UNet recipes side by side on the one device for MIN minutes each
# (make_base_model --unet-minutes), evaluates each (eval_base_model), and LoRA-trains the three
# style folders on the best one (eval_style). OUT gets a summary log and, per model, the text
# encoder weights (gzipped) and a tar of the rest. Smoke test on a CPU:
#   DEV=cpu MIN=0.1 TMO=400 SCENES=600 VSCENES=600 VSTEPS=10 DSTEPS=5 BA=4 BC=4 bash tools/base_sweep.sh
DEV=${DEV:-cuda}; MIN=${MIN:-5}; SCENES=${SCENES:-48000}; VSTEPS=${VSTEPS:-3000}; DSTEPS=${DSTEPS:-1000}
OUT=${OUT:-/tmp/out}; W=${W:-/tmp/b}; mkdir -p $OUT $W
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
( nvidia-smi -L; python3 -c "import torch,diffusers,transformers;print(torch.__version__,diffusers.__version__,transformers.__version__)" ) 2>&1 | tee $OUT/summary.log
el vae | tee -a $OUT/summary.log
python3 -m tools.make_base_model --device $DEV --out $W/v0 --scenes ${VSCENES:-16000} --vae-steps $VSTEPS --vae-batch 64 \
  --decoder-steps $DSTEPS --unet-steps 0 --eval-every 0 --vae-cache $W/vae > $W/vae.log 2>&1 || { tail -30 $W/vae.log; exit 1; }
grep -E "vae step [0-9]+00/|decoder step.*/|MSE|scaling" $W/vae.log | tail -6 | tee -a $OUT/summary.log
el unets | tee -a $OUT/summary.log
common="--device $DEV --vae-cache $W/vae --scenes $SCENES --heads 4 --train-text-encoder --unet-minutes $MIN --eval-every 0"
timeout ${TMO:-$(( ${MIN%.*} * 60 + 150 ))} python3 -m tools.make_base_model $common --out $W/A --zero-snr --noise-offset 0 --unet-batch ${BA:-128} > $W/A.log 2>&1 &
timeout ${TMO:-$(( ${MIN%.*} * 60 + 150 ))} python3 -m tools.make_base_model $common --out $W/B --noise-offset 0.1 --unet-batch ${BA:-128} > $W/B.log 2>&1 &
timeout ${TMO:-$(( ${MIN%.*} * 60 + 150 ))} python3 -m tools.make_base_model $common --out $W/C --zero-snr --noise-offset 0 --unet-batch ${BC:-256} --unet-lr 1.5e-3 > $W/C.log 2>&1 &
wait
el evals | tee -a $OUT/summary.log
for r in A B C; do
  grep -E "ms/step|wrote|Error|error" $W/$r.log | tail -3 | sed "s/^/$r: /" | tee -a $OUT/summary.log
  [ -f $W/$r/model_index.json ] && python3 -m tools.eval_base_model --model $W/$r --device $DEV --seeds 6 > $W/$r.eval 2>&1 &
done
wait
for r in A B C; do
  [ -f $W/$r/model_index.json ] || continue
  echo "== $r" >> $OUT/summary.log; grep -v Warning $W/$r.eval | tail -60 >> $OUT/summary.log
  cp $W/$r.log $W/$r.eval $W/vae.log $W/$r/ 2>/dev/null
  gzip -1 -c $W/$r/text_encoder/model.safetensors > $OUT/$r-te.safetensors.gz
  tar -C $W -cf $OUT/$r.tar --exclude=text_encoder/model.safetensors --exclude=tokenizer $r
done
best=$(python3 - "$W" <<'PY'
import json, sys, pathlib
bar = {"colour": 0.95, "shape": 0.85, "background": 0.80, "flat": 0.90}
def score(r):
    try:
        text = (pathlib.Path(sys.argv[1]) / f"{r}.eval").read_text()
        held = json.loads(text[text.index("{"):text.rindex("}") + 1])["held_out_pairs"]
    except Exception:
        return -1
    return sum(min(held[k] / v, 1) for k, v in bar.items()) + 0.01 * sum(held[k] for k in bar)
print(max("ABC", key=score))
PY
)
el "best $best; styles" | tee -a $OUT/summary.log
if [ $(( $(date +%s) - T0 )) -lt ${STYLE_BY:-470} ]; then
  for s in neon halftone toon; do
    timeout ${STMO:-100} python3 -m tools.eval_style sample_data/styles/$s --base $W/$best --trigger zqx --half \
      --preset tiny-cpu-demo --set device=\"$DEV\" --out $W/style-$s > $W/style-$s.log 2>&1 &
  done
  wait
  for s in neon halftone toon; do echo "== style $s" >> $OUT/summary.log; grep -v -i warn $W/style-$s.log | tail -n 25 >> $OUT/summary.log; done
fi
el done | tee -a $OUT/summary.log
