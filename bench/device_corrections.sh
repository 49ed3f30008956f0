# What the statistics corrections cost on the lent GPU (issue 16), in the background:
#   mkdir -p /tmp/dev; source bench/device_setup.sh && setsid bash bench/device_corrections.sh > /tmp/dev/driver.log 2>&1 < /dev/null &
# then bash bench/device_poll.sh from the next calls. Rows (the default params.yaml, streamed):
# 1) Llama-3-8B's block shape with 4 layers: quantize without either correction (off), with
#    quantize.correct_input_scales alone (input), correct_row_scales alone (rows), both (both: the default);
#    the earlier stages run once per row; the model is made once;
# 2) one decoder layer of Llama-3-70B's shape (hidden 8192, ffn 28672, 64/8 heads) with both corrections:
#    its peak GPU memory (the 28672-wide down input's d×d products);
# 3) the rotate stage on (rotate.enabled, the default corrections): the 8B shape (rot) and the 70B layer
#    (rot70b) — what writing the rotated copy costs, and the later stages on it.
# ROWS="off both 70b" runs a subset.
stages="calibrate sensitivity allocate scale_fold quantize"
common="--stream true --sensitivity-own-fit --stages $stages"
rows=${ROWS:-"off input rows both 70b"}
mkdir -p /tmp/dev
eight() {  # the 8B-shape model the first row made, or a new one
    if [ -e /tmp/dev/off/model/config.json ]; then echo "--model /tmp/dev/off/model"; else echo "--layers 4"; fi
}
for row in $rows; do
    case $row in
        off) python3 bench/scale.py $common --layers 4 --out /tmp/dev/off \
                 --set quantize.correct_input_scales=false quantize.correct_row_scales=false ;;
        input) python3 bench/scale.py $common $(eight) --out /tmp/dev/input \
                   --set quantize.correct_input_scales=true quantize.correct_row_scales=false ;;
        rows) python3 bench/scale.py $common $(eight) --out /tmp/dev/rows \
                  --set quantize.correct_input_scales=false quantize.correct_row_scales=true ;;
        both) python3 bench/scale.py $common $(eight) --out /tmp/dev/both \
                  --set quantize.correct_input_scales=true quantize.correct_row_scales=true ;;
        70b) python3 bench/scale.py $common --hidden 8192 --ffn 28672 --heads 64 --kv-heads 8 --layers 1 \
                 --set quantize.correct_input_scales=true quantize.correct_row_scales=true --out /tmp/dev/70b ;;
        rot) python3 bench/scale.py $common rotate $(eight) --out /tmp/dev/rot --set rotate.enabled=true ;;
        rot70b) python3 bench/scale.py $common rotate --hidden 8192 --ffn 28672 --heads 64 --kv-heads 8 --layers 1 \
                    --out /tmp/dev/rot70b --set rotate.enabled=true ;;
    esac > /tmp/dev/$row.md 2> /tmp/dev/$row.log
done
touch /tmp/dev/done
