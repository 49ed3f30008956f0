# The scale rows of issue 14 on the lent GPU, in the background so that they outlive one 10-minute call:
#   mkdir -p /tmp/dev; source bench/device_setup.sh && setsid bash bench/device_scale.sh > /tmp/dev/driver.log 2>&1 < /dev/null &
# then poll /tmp/dev (bench/device_poll.sh) from the next calls while the machine is warm (30 s idle ends it).
# To stop it from a later call: pkill -f "[d]evice_scale" (a plain pattern matches that call's own shell).
# The stages of the acceptance rows (export_onnx needs optimum, which the device image lacks):
stages="calibrate sensitivity allocate scale_fold quantize export_gguf validate"
# 1) Llama-3-8B's shape, all 32 layers, streamed, calibrate … validate (torch), sensitivity with haloquant's fit
#    alone (sensitivity.llama_cpp_candidate: false: about half the stage's time on a GPU);
# 2) one decoder layer of Llama-3-70B's shape with the whole-model metric (kl_fisher), own fit, for the extrapolation;
# 3) the 8B shape again with the default sensitivity (llama.cpp's candidate too), if the machine is still held.
mkdir -p /tmp/dev
python3 bench/scale.py --stream true --sensitivity-own-fit --stages $stages --out /tmp/dev/8b > /tmp/dev/8b.md \
    2> /tmp/dev/8b.log
python3 bench/scale.py --hidden 8192 --ffn 28672 --heads 64 --kv-heads 8 --layers 1 --stream true --metric kl_fisher \
    --sensitivity-own-fit --stages $stages --out /tmp/dev/70b > /tmp/dev/70b.md 2> /tmp/dev/70b.log
python3 bench/scale.py --stream true --model /tmp/dev/8b/model --stages $stages --out /tmp/dev/8b-default \
    > /tmp/dev/8b-default.md 2> /tmp/dev/8b-default.log
touch /tmp/dev/done
