# bench/low_bit.py on the lent GPU for a real checkpoint too large for one call's carry (issue 16). The model
# travels as its published GGUF, with any extra wheels (AutoRound's environment), as one tar split over several
# calls into .xfer/xN/blob.partN; each call moves what it carried to /tmp/xfer (a carried path that the next call
# does not carry is gone there, /tmp stays while the machine is warm), and the model is rebuilt exactly as
# ../shared/models/fetch_real.py does here (bench/gguf_to_hf.py, checked against meta/sums.json, the local copy's
# per-tensor sums):
#   STEP=setup (carry .whl .venv/share/haloquant .xfer/meta): installs .whl (bench/device_setup.sh); .xfer/meta/run
#              may hold folders of a local run of the same model to reuse (calibrate/, sensitivity/);
#   STEP=part  (carry .xfer/xN): nothing but the transfer;
#   STEP=run   (carry the last part): joins the parts (sha256 against $SHA), installs the tar's wheels/, rebuilds
#              its model.gguf at $MODEL (the path used here, so a sensitivity journal's key matches), starts
#              low_bit.py --device cuda $ARGS in the background (setsid), then polls like STEP=poll; with
#              PAIRS="Q2_K:q2_k_s Q3_K_S:q3_k_s" AutoRound tunes those formats side by side on the GPU meanwhile
#              (into $RUN/ar), then a second low_bit.py --autoround scores them; with PAIRS and no ARGS, AutoRound
#              alone; with ARGS="... --build-only", files are built, not scored (the CPU machine scores them);
#   STEP=pieces FIRST=k: pieces k..k+3 (16 MB each) of the built files $FILES (paths under $RUN; default: every
#              AutoRound file), split once, returned in $OUT — one call moves 64 MB;
#   STEP=poll: waits up to $WAIT s, returns the small results (tables, score.json files, AutoRound's records,
#              sensitivity.json, its journal, logs) in $OUT/lowbit.tgz.
# Packing (here): bash bench/device_pack.sh MODEL.gguf [WHEELS] writes the parts and prints SHA; a part must fit one
# call's carry beside the tracked tree (64 MiB together: 60 MB parts stopped fitting once the tree grew to 16 MB).
# Run on 2026-12-07 for SmolLM2-135M's AutoRound rows: setup, part, run and poll as written (the /tmp/xfer move
# then done by hand); AutoRound alone and STEP=pieces were the same commands typed inline, not yet run as written.
# Run on 2026-12-07 (16:44 UTC session) for Qwen2.5-Coder-0.5B: setup, part, run with PAIRS (three formats in
# ≈ 300 s each, side by side), pieces and poll as written. Scoring there takes ≈ 5 min a file (full-vocabulary KL
# on the CPU), so the files came back in pieces (7 calls a file) and were scored on the CPU machine, and the run was
# stopped before its second low_bit.py; the device's score of the same llama.cpp+imatrix file matched this
# machine's chunk for chunk. Not yet run on the device: --build-only and STEP=pieces with FILES (written on
# 2026-12-07, 19:58 UTC, when no machine was lent; the pieces step and the job script dry-run here with a stub python3).
set -u
RUN=/tmp/lowbit X=/tmp/xfer
mkdir -p $X && [ -d .xfer ] && cp -r .xfer/. $X/
if [ "$STEP" = setup ]; then
    source bench/device_setup.sh || exit 1
    python3 -c "import transformers, pydantic, llama_cpp, gguf; print('setup ok', transformers.__version__)"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; exit 0
fi
[ "$STEP" = part ] && { du -sh $X/*; exit 0; }
export PYTHONPATH=/tmp/site:$PWD:$PWD/.venv/share/haloquant/llama.cpp/gguf-py
export HALOQUANT_LLAMA_CONVERTER=$PWD/.venv/share/haloquant/llama.cpp DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
export HALOQUANT_AUTOROUND_PYTHON=python3 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
prepare() {  # the model (and any wheels) from the carried parts
    mkdir -p $RUN /tmp/blob
    [ -d $X/meta/run ] && cp -r $X/meta/run/. $RUN/  # folders of a local run to reuse (calibrate, sensitivity)
    cat $(ls $X/x*/blob.part* | sort -V) > /tmp/blob.tar
    echo "$SHA  /tmp/blob.tar" | sha256sum -c - || return 1
    tar xf /tmp/blob.tar -C /tmp/blob && rm /tmp/blob.tar
    if ls /tmp/blob/wheels/*.whl > /dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            /tmp/blob/wheels/*.whl || return 1
        rm -rf /tmp/site/gguf  # the carried gguf-py stays the gguf module (bench/device_setup.sh)
    fi
    python3 bench/gguf_to_hf.py /tmp/blob/model.gguf "$MODEL" --check $X/meta/sums.json > $RUN/convert.log 2>&1 \
        || { tail -n 20 $RUN/convert.log; return 1; }
    tail -n 1 $RUN/convert.log
}
if [ "$STEP" = run ]; then  # PAIRS, ARGS: see the header
    prepare || exit 1
    cat > $RUN/job.sh << EOS
for p in ${PAIRS:-}; do
    f=\${p#*:}; python3 bench/autoround_gguf.py --model $MODEL --formats \$f --out $RUN/ar --device-map cuda \\
        > $RUN/ar-\$f.log 2>&1 &
done
[ -n "${ARGS:-}" ] && python3 bench/low_bit.py --model $MODEL --device cuda --out $RUN $ARGS > $RUN/low_bit.log 2>&1
wait
if [ -n "${PAIRS:-}" ] && [ -n "${ARGS:-}" ]; then
    for p in ${PAIRS:-}; do mkdir -p $RUN/\${p%:*}; ln -sfn $RUN/ar/\${p#*:} $RUN/\${p%:*}/autoround; done
    python3 bench/low_bit.py --model $MODEL --device cuda --out $RUN $ARGS --autoround > $RUN/low_bit_ar.log 2>&1
fi
EOS
    setsid bash -c "bash $RUN/job.sh; touch $RUN/done" < /dev/null > /dev/null 2>&1 &
fi
if [ "$STEP" = pieces ]; then  # $OUT gets pieces $FIRST.. (at most 4) of $FILES (paths under $RUN, globs allowed;
    # default: every AutoRound file), split once into 16 MB pieces named by the file's folder (a/b → a+b.NN)
    if [ ! -e /tmp/pieces ]; then
        files=${FILES:-$(for j in $RUN/ar/*/autoround.json; do python3 -c "import json, os, sys; \
            print(os.path.relpath(json.load(open(sys.argv[1]))['gguf'], '$RUN'))" $j; done)}
        mkdir -p /tmp/pieces
        for f in $(cd $RUN && ls -d $files); do
            (cd $RUN && sha256sum $f); split -b 16000000 -d $RUN/$f /tmp/pieces/$(dirname $f | tr / +).
        done
    fi
    ls /tmp/pieces | sort | tail -n +$((FIRST + 1)) | head -4 | while read p; do cp /tmp/pieces/$p $OUT/; done
    ls /tmp/pieces | wc -l; exit 0
fi
end=$((SECONDS + ${WAIT:-500}))
while [ ! -e $RUN/done ] && [ $SECONDS -lt $end ]; do sleep 10; done
cat $RUN/*.log 2>/dev/null | grep -v "it/s\]$" | grep -v "fallback model" | tail -n 25 | cut -c1-400
wc -l $RUN/sensitivity.resume/*.jsonl 2>/dev/null
nvidia-smi --query-gpu=memory.used --format=csv,noheader
(cd $RUN && find . -size -20M \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.log' \
    -o -name '*.txt' \) | tar czf $OUT/lowbit.tgz -T -)
[ -e $RUN/done ] && echo ALL-DONE || echo STILL-RUNNING
