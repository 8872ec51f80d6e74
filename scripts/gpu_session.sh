#!/usr/bin/env bash
# One GPU session's measurements, in the order the device tool's time limits allow (see docs/benchmarks.md).
#   bash scripts/gpu_session.sh setup      # after the onnxruntime-gpu / diffusers bundle is installed in /tmp/site
#   bash scripts/gpu_session.sh export     # fp16 (fused UNet/VAE, the default), fp32 and plain-fp16 artefacts of the random
#                                          # full-size pipeline, in parallel, in the background
#   bash scripts/gpu_session.sh measure    # waits for the exports, then option sweep, kernel profile, load, fidelity, benchmark,
#                                          # plain-fp16 validate + benchmark, placement, in the background; logs in /tmp/logs
#   bash scripts/gpu_session.sh all        # setup, export, measure
#   bash scripts/gpu_session.sh short SEC  # setup, fp16 export in the foreground, then measure; collect up to SEC s
#   bash scripts/gpu_session.sh collect SEC  # copy /tmp/logs into $OUT/logs.tgz every 10 s until done or SEC s
#   bash scripts/gpu_session.sh multi      # (2+ GPUs, ray wheels in the bundle) Ray Serve 1 and 2 replicas, placement on cuda:1,
#                                          # load test, plain fp16 validate + benchmark
#   bash scripts/gpu_session.sh all-multi  # setup, fp16 + plain fp16 exports, multi
#   bash scripts/gpu_session.sh all-ray    # setup, fp16 export, the Ray levels only
#   bash scripts/gpu_session.sh all-bench  # setup, fp16 export, `audioldm2-trt bench` (batch 1, 4 waveforms, DDIM-200,
#                                          # --backend ort-trt without TensorRT), benchmark.py's runtime rows
#   bash scripts/gpu_session.sh all-splitgelu  # setup, fp16 export and a UNet variant with BiasSplitGelu at once, its
#                                          # UNet validated, bench default vs variant, its kernels, its fidelity
#   bash scripts/gpu_session.sh all-foldbias  # setup, fp16 export (biases folded) and the UNet without the fold at once,
#                                          # validate, bench default vs variant, both UNets' kernels, fidelity
#   bash scripts/gpu_session.sh all-padgeglu  # setup, fp16 export (GEGLUs widened) and the UNet without the widening at
#                                          # once, validate, bench and DDIM-200 default vs variant, kernels, fidelity, memory
#   bash scripts/gpu_session.sh all-lnfold  # the same for fold_bias.py's third rewrite (proj_in bias + norm1 as one
#                                          # SkipLayerNormalization) against the UNet without it
#   bash scripts/gpu_session.sh all-hoist  # the same for the UNet's context graph (hoist_context.py: the text-only
#                                          # work once per request) against the UNet without it
#   bash scripts/gpu_session.sh all-tembmerge  # the same for the ResNets' time-embedding projections as one GEMM per
#                                          # width (sibling_gemms.py) against 22 GEMMs, with tests/test_gpu.py
#   bash scripts/gpu_session.sh all-clapattn  # the same for CLAP's text branch with MultiHeadAttention (the default)
#                                          # against it unfused, with loop_start_probe.py on each
#   bash scripts/gpu_session.sh all-textvoc  # the same for CLAP_TEXT_MEA and VOCODER_BIAS_ADD (the default since run
#                                          # CR) against the recipes before them, with loop_start_probe.py
#   bash scripts/gpu_session.sh all-biasadds  # the same for the VAE decoder's and the UNet's remaining convolution
#                                          # biases as Adds (unet_variant.py vae_bias_add, unet_bias_add), each variant
#                                          # validated on its component, with its fidelity
#   bash scripts/gpu_session.sh all-latents  # setup, fp16 export (tests/test_gpu.py meanwhile); validate, the initial
#                                          # latents drawn during GPT-2's passes against after the text stage
#                                          # (loop_start_probe.py alternating), bench, every component's kernel profile
#   bash scripts/gpu_session.sh all-gpt2fuse  # the same for GPT-2's fusions (self_attention.py and the optimizer's
#                                          # gpt2 fusions) against GPT-2 converted without fusion; GPT-2's kernels
#   bash scripts/gpu_session.sh all-textfuse  # the same for T5's and CLAP text's fusions against each unfused
#   bash scripts/gpu_session.sh all-queued  # setup, fp16 export, validate, the denoising steps queued one ahead (the
#                                          # default) against each waited for: bench alternating and DDIM-200, the
#                                          # loop checks (queued = step by step, cancel mid-loop), fidelity, benchmark rows
#   bash scripts/gpu_session.sh all-wblock  # setup, fp16 and fp32 exports; the NhwcConv components' weights in the
#                                          # runtime's own block against one allocation per weight (audio, bench
#                                          # alternating, peak memory, validate, cold start), then the full benchmark
#                                          # with the peers and the fp32 row, fidelity
#   bash scripts/gpu_session.sh all-textgraphs  # setup, fp16 and fp32 exports (tests/test_gpu.py meanwhile); the
#                                          # once-per-request text sessions without CUDA graphs against the default:
#                                          # peak memory (and B0), bench alternating; validate, cold start, the full
#                                          # benchmark with the peers and the fp32 row, fidelity
#   bash scripts/gpu_session.sh all-noarena  # setup, fp16 export (tests/test_gpu.py meanwhile); at the default
#                                          # since run BF (one arena per session) and with the decode stage uncaptured
#                                          # on the shared arena: runtimes driven at once, peak memory (and B0), bench
#                                          # alternating, the load test; the captured arena's failure again
#   bash scripts/gpu_session.sh all-ownbuffers-full  # setup, fp16 export; the captured decode stage on the shared
#                                          # arena with the runtime's own buffers at full size (run BJ's fix), peak memory,
#                                          # bench alternating, then the benchmark with the peers (no fp32 row)
#   bash scripts/gpu_session.sh all-memline-full  # setup, fp16 export; the two cheapest memory savings left at the
#                                          # default since run BN (256 KiB cuBLAS workspace; CLAP text and projection
#                                          # uncaptured): peak memory against B0, bench alternating (batch 1 and 4),
#                                          # then the 100-prompt fidelity and cold start in clean processes at the default
#                                          # (run BP, as of 1bd5a4c: its "default" is the default of runs BN-BP)
#   bash scripts/gpu_session.sh all-memline-rest  # setup, fp16 export; what run BP's lost machine left undone (run BQ)
#   bash scripts/gpu_session.sh all-newdefault-full  # setup, fp16 export; the default since run BP against the one
#                                          # before it: peak memory, bench alternating, batch 4, cold start, fidelity,
#                                          # the benchmark with the peers
#   bash scripts/gpu_session.sh all-current  # setup, fp16 + fp32 exports; the issue's whole table at the current
#                                          # default: validate, bench (batch 1, DDIM-200, batch 4), the decode stage's
#                                          # overhead, kernels, peak memory against B0, the peers and the fp32 row in one
#                                          # process, fidelity
#   bash scripts/gpu_session.sh all-peers  # setup, fp16 export; only the benchmark with the peers (run BT: what run
#                                          # BS's machine took with it)
#   bash scripts/gpu_session.sh all-defaultarena-full  # setup, fp16 export; the default since run BN (the decode
#                                          # stage captured on the shared arena): test_gpu.py, a two-runtime check,
#                                          # bench alternating with one arena per session, the benchmark with the peers,
#                                          # the load test (run BN's 8 trials: all-decodearena-full at 86b6783)
#   bash scripts/gpu_session.sh all-lmloop  # setup, fp16 export; meanwhile a tiny fp32 export and its vocoder failure
#                                          # narrowed down; then GPT-2's passes on the device against on the host
#                                          # (text_stage.py, bench alternating), the benchmark with the peers, peak
#                                          # memory, cold start, validate, fidelity
#   bash scripts/gpu_session.sh all-textpar  # setup, fp16 export, the text stage with CLAP run while T5 runs against
#                                          # before (text_stage.py), bench, the loop checks, the load test
#   bash scripts/gpu_session.sh all-vocfix  # setup, fp32 export; the fp32 vocoder's heuristic search (the default
#                                          # since run AU) against the exhaustive one through the failing batch shapes
#                                          # (tiny and full size), the failing script, validate and bench of fp32
#   bash scripts/gpu_session.sh all-two-gpu  # (2 GPUs, Ray wheels) setup, fp16 export, placement on cuda:1, the Ray levels
#   bash scripts/gpu_session.sh all-unet   # setup, fp16 + fp32 exports, the UNet recipes compared (ort_sweep --unet-recipes),
#                                          # validate, the full benchmark with the peers, fidelity, kernel profile
#   bash scripts/gpu_session.sh all-sdpa   # setup, fp16 + fp32 exports, the UNet's attention kernels swept, then benchmark
#                                          # (default vs ORT's own kernel choice, sdpa_kernel 0) and fidelity of that choice
#   bash scripts/gpu_session.sh all-cold   # setup, fp16 export, cold start in clean processes (scripts/cold_start.py), validate
#   bash scripts/gpu_session.sh all-final  # setup, fp16 + fp32 exports, validate, bench, cold start, peak memory, full
#                                          # benchmark with the peers, fidelity
#   bash scripts/gpu_session.sh all-load   # setup, fp16 export, load test on one GPU
#   bash scripts/gpu_session.sh all-conv-search  # setup, fp16 + fp32 exports, the vocoder's cuDNN algorithm search
#                                          # swept (exhaustive, heuristic, none), cold start with each
#   bash scripts/gpu_session.sh all-check-ray  # (2 GPUs, Ray wheels) setup, fp16 export, validate, fidelity, benchmark
#                                          # without the compiled peers, then the Ray levels
#   bash scripts/gpu_session.sh smoke      # setup, tiny fp16 export, then the measurement scripts on it (they run on CUDA?)
#   bash scripts/gpu_session.sh overhead   # setup, tiny fp16 export, step_overhead.py (host time between GPU work)
#   bash scripts/gpu_session.sh ownbuffers # setup, tiny fp16 export, the captured decode stage on the shared arena with the
#                                          # runtime's own buffers against ONNX Runtime's (the arena's), then uncaptured
#   bash scripts/gpu_session.sh all-solver-graph  # setup, fp16 export, the solver step captured against uncaptured,
#                                          # device loop against host loop, bench (DPM-20, DDIM-200), benchmark with peers
#   bash scripts/gpu_session.sh all-loop-handoff  # setup, fp16 export, the loop's steps in one hand-off against one
#                                          # a step (and the solver uncaptured), device vs host loop, bench, fidelity
#   bash scripts/gpu_session.sh all-profile  # setup, fp16 export, every component's kernels by category (profile_kernels.py)
#   bash scripts/gpu_session.sh all-memory # setup, fp16 + fp32 exports, where GPU memory goes (tiny and full), the
#                                          # options swept from the runtime's own, peak memory with and without ranking,
#                                          # the full benchmark with a fuse_conv_bias row, fidelity
# 'short' is the plan for a session with little device time left: fp16 artefacts only, no compiled peers.
# For 'multi', pack Ray too:  bash ../shared/device/prepare.sh soxr==1.0.0 nvidia-ml-py $(cat scripts/device_ray_specs.txt)
set -uo pipefail
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # KINDS.md: never multicast
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SELF="$ROOT/scripts/gpu_session.sh"
# Ray Serve, 1 and 2 replicas, profiled (modes multi and ray; run from scripts/)
RAY_LEVELS="python3 multi_gpu.py ray --artifacts /tmp/art-fp16 --replicas 1 2 --concurrency 1 4 8 16 32 --rounds 6 \
  --out /tmp/logs > /tmp/logs/multi_ray.log 2>&1"
# Steps several modes share (run from scripts/ after the exports they need)
# BENCH_OPTIONS='{"unet": {...}}' (exported, read when the step runs): also a row with those per-component options
BENCH_WITH_PEERS="python3 benchmark.py --fp16 /tmp/art-fp16 --fp32 /tmp/art-fp32 --runs 10 \
  --skip fp16_nograph,fp16_notf32 \${BENCH_OPTIONS:+--provider-options \"\$BENCH_OPTIONS\"} --out /tmp/logs > /tmp/logs/bench.log 2>&1"
# the same without the fp32 export: the peers (B0, B1, B2) and the fp16 runtime only
BENCH_PEERS_FP16="python3 benchmark.py --fp16 /tmp/art-fp16 --runs 10 --skip fp32,fp16_host_loop,fp16_nograph,fp16_notf32 \
  --out /tmp/logs > /tmp/logs/bench.log 2>&1"
FIDELITY="python3 fidelity.py --fp16 /tmp/art-fp16 --out /tmp/logs > /tmp/logs/fidelity.log 2>&1"
# the bench command in its own process on the fp16 artefacts: the request (20 warm calls), and DDIM-200 (3)
BENCH_CLI="(cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-fp16 --device cuda --runs 20 \
  --json /tmp/logs/bench-cli.json > /tmp/logs/bench-cli.log 2>&1)"
BENCH_CLI_DDIM200="(cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-fp16 --device cuda --runs 3 \
  --scheduler ddim --steps 200 --json /tmp/logs/bench-cli-ddim200.json > /tmp/logs/bench-cli-ddim200.log 2>&1)"
# the device loop's designs against each other in one process, then the device loop against the host loop
LOOP_CHECKS="python3 step_overhead.py --artifacts /tmp/art-fp16 --rounds 10 --out /tmp/logs > /tmp/logs/overhead.log 2>&1; \
  python3 device_loop_check.py --artifacts /tmp/art-fp16 --out /tmp/logs > /tmp/logs/loopcheck.log 2>&1"
# `bench` alternating, 3 rounds of 20 calls: what run BJ's fix costs where the arena is in use — the projection run
# uncaptured, off the arena (proj) and on it (own: the arena registered, so every session's buffers are in memory of
# the runtime's own; the difference between the two is theirs), and the default; $ART (default /tmp/art-fp16)
OWN_BUFFERS_BENCH="for r in 1 2 3; do for v in default proj own; do \
    case \$v in default) o= ;; proj) o='--uncaptured projection' ;; \
      own) o='--shared-arena projection --uncaptured projection' ;; esac; \
    (cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts \${ART:-/tmp/art-fp16} --device cuda --runs 20 \$o \
      --json /tmp/logs/bench-\$v-\$r.json > /tmp/logs/bench-\$v-\$r.log 2>&1); done; done"
VALIDATE16="(cd /tmp && python3 -m audioldm2_trt.cli validate /tmp/art-fp16 --device cuda > /tmp/logs/validate16.log 2>&1)"
# tests/test_gpu.py from the clone, the installed bundle first on the path
TEST_GPU="(cd /tmp && python3 -m pytest --import-mode=append -p no:cacheprovider -q $ROOT/tests/test_gpu.py \
  > /tmp/logs/pytest-gpu.log 2>&1)"
# A mode's steps ($1: shell commands joined by "; ") in the background, run from scripts/; /tmp/logs/done once they
# have ended (collect waits for it)
in_background() {
  cd "$ROOT/scripts" || exit 1
  rm -f /tmp/logs/done
  touch /tmp/logs/started  # collect's sign that this machine is the one the mode started on
  setsid bash -c "$1; touch /tmp/logs/done" &
  echo started
}
# The default fp16 export against variants ($1: one or more of unet_variant.py's, space-separated), exported beside it
# while the export runs: the default validated, `bench` alternating over three rounds and DDIM-200 for each, the
# kernels of the components $2 (default unet) for each, the steps $3 if given, the default's 100-prompt fidelity, peak
# memory of each
variant_ab() {
  local vs=$1 kcomp=${2:-unet} extra=${3:+$3; } outs=""
  for v in $vs; do outs="$outs /tmp/art-$v"; done
  in_background "python3 unet_variant.py --artifacts /tmp/art-fp16 --source random:audioldm2 --variant $vs \
      --out $outs > /tmp/logs/variant.log 2>&1; \
    bash $SELF wait 16; \
    $VALIDATE16; \
    for r in 1 2 3; do for a in fp16 $vs; do (cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-\$a \
      --device cuda --runs 20 --json /tmp/logs/bench-\$a-\$r.json > /tmp/logs/bench-\$a-\$r.log 2>&1); done; done; \
    for a in fp16 $vs; do (cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-\$a --device cuda \
      --runs 3 --scheduler ddim --steps 200 --json /tmp/logs/ddim200-\$a.json > /tmp/logs/ddim200-\$a.log 2>&1); done; \
    for a in fp16 $vs; do python3 profile_kernels.py --artifacts /tmp/art-\$a --top 40 --components $kcomp \
      --out /tmp/logs/kernels-\$a > /tmp/logs/kernels-\$a.log 2>&1; done; \
    $extra$FIDELITY; \
    for a in fp16 $vs; do mkdir -p /tmp/logs/peak-\$a; python3 peak_memory.py --artifacts /tmp/art-\$a --which runtime \
      --out /tmp/logs/peak-\$a > /tmp/logs/peak-\$a.log 2>&1; done"
}
# the steps (for variant_ab's $3) running loop_start_probe.py, 20 requests, on the artefacts /tmp/art-NAME of each NAME
probe_steps() {
  echo "for a in $*; do python3 loop_start_probe.py --artifacts /tmp/art-\$a --requests 20 \
    --out /tmp/logs/probe-\$a > /tmp/logs/probe-\$a.log 2>&1; done"
}
# setup, then an fp16 export of the random config $1 into $2 in the foreground (log $3), timed from $t0
setup_export_foreground() {
  bash "$SELF" setup || exit 1
  (cd /tmp && python3 -m audioldm2_trt.cli export --random-weights "$1" --precision fp16 --out "$2" --overwrite \
    > "$3" 2>&1) || { tail -30 "$3"; exit 1; }
  echo "$1 export done at $((SECONDS - t0)) s"
}
# setup, the exports named in $1 ("16 32" …), then the mode $2
setup_export_then() {
  bash "$SELF" setup || exit 1
  bash "$SELF" export $1 && bash "$SELF" "$2"
}
mkdir -p /tmp/logs
case "$1" in
  setup)
    mkdir -p /tmp/pkg/audioldm2_trt
    cp "$ROOT"/audioldm2_trt/*.py /tmp/pkg/audioldm2_trt/
    ln -sfn "$ROOT/export" /tmp/pkg/audioldm2_trt/export
    ln -sfn "$ROOT/runtime" /tmp/pkg/audioldm2_trt/runtime
    [ -d "$ROOT/.whl" ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$ROOT"/.whl/*.whl
    cd /tmp && python3 -c "import audioldm2_trt.runtime, soxr, pynvml; print('setup ok')" ;;
  export)  # in the background: the exports named (16, 32, 16p, nchw; default 16 32 16p); each pid in /tmp/logs/export*.pid
    shift
    tags=${@:-16 32 16p}
    set -- $tags
    # torch's threads split between the exports: three at once with all 16 cores each oversubscribed the device
    # (load 48) and none finished in 10 minutes, where one plain fp16 export alone takes 133-162 s (fused, the fp16
    # default: 312 s with 16 threads on the 32-core host, 421 s on the 16-core one)
    export OMP_NUM_THREADS=$(( $(nproc) / $# )) MKL_NUM_THREADS=$(( $(nproc) / $# ))
    cd /tmp
    for tag in $tags; do
      case $tag in
        16) args="--precision fp16 --out /tmp/art-fp16" ;;
        32) args="--out /tmp/art-fp32" ;;
        16p) args="--precision fp16 --fuse none --out /tmp/art-fp16-plain" ;;
        nchw) args="--precision fp16 --unet-layout nchw --out /tmp/art-nchw" ;;
      esac
      # --verbose: one line per component with its time
      setsid python3 -m audioldm2_trt.cli --verbose export --random-weights audioldm2 $args --overwrite \
        > /tmp/logs/export$tag.log 2>&1 &
      echo $! > /tmp/logs/export$tag.pid
    done
    echo started ;;
  wait)  # until the exports named (16, 32, 16p, nchw) have ended
    shift
    for tag in "$@"; do
      while [ -f /tmp/logs/export$tag.pid ] && kill -0 "$(cat /tmp/logs/export$tag.pid)" 2>/dev/null; do sleep 2; done
    done ;;
  measure)  # in the background, most wanted first; logs in /tmp/logs, /tmp/logs/done at the end
    in_background "bash $SELF wait 16 32; \
      python3 ort_sweep.py --fp16 /tmp/art-fp16 --fp32 /tmp/art-fp32 --out /tmp/logs > /tmp/logs/sweep.log 2>&1; \
      python3 profile_kernels.py --artifacts /tmp/art-fp16 --out /tmp/logs > /tmp/logs/kernels.log 2>&1; \
      python3 load_test.py --artifacts /tmp/art-fp16 --device cuda --out /tmp/logs ${LOAD_ARGS:-} > /tmp/logs/load.log 2>&1; \
      $FIDELITY; \
      python3 benchmark.py --fp16 /tmp/art-fp16 --fp32 /tmp/art-fp32 --runs 10 --skip ${SKIP:-none} --out /tmp/logs \
        > /tmp/logs/bench.log 2>&1; \
      bash $SELF wait 16p; mkdir -p /tmp/logs/plain; \
      $VALIDATE16; \
      python3 benchmark.py --fp16-plain /tmp/art-fp16-plain --runs 10 --skip b0 --out /tmp/logs/plain > /tmp/logs/bench16p.log 2>&1; \
      python3 ort_placement.py /tmp/art-fp16 > /tmp/logs/placement.log 2>&1" ;;
  all)  # setup, then exports and measurements in the background
    setup_export_then "16 32 16p" measure ;;
  multi)  # (2+ GPUs, Ray wheels in the bundle) after the fp16 export: Ray 1 and 2 replicas (profiled), placement on
           # cuda:1, load test on GPU 0; then, if the plain fp16 export was started, the
           # validation of the default fp16 artefacts and a benchmark of both
    in_background "bash $SELF wait 16; \
      $RAY_LEVELS; \
      python3 multi_gpu.py placement --artifacts /tmp/art-fp16 --out /tmp/logs > /tmp/logs/multi_placement.log 2>&1; \
      python3 load_test.py --artifacts /tmp/art-fp16 --device cuda --out /tmp/logs ${LOAD_ARGS:-} > /tmp/logs/load.log 2>&1; \
      if [ -f /tmp/logs/export16p.pid ]; then bash $SELF wait 16p; mkdir -p /tmp/logs/plain; \
        $VALIDATE16; \
        python3 benchmark.py --fp16 /tmp/art-fp16 --fp16-plain /tmp/art-fp16-plain --runs 10 \
          --skip b1,b2,fp16_nograph,fp16_notf32,fp32 --out /tmp/logs/plain > /tmp/logs/bench16p.log 2>&1; fi" ;;
  bench)  # after the fp16 export: the bench command (batch 1, 4 waveforms, DDIM-200), the TensorRT provider's
           # refusal where TensorRT is missing, then benchmark.py's runtime rows on the same machine
    in_background "bash $SELF wait 16; $BENCH_CLI; cd /tmp; \
      python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-fp16 --device cuda --runs 10 --waveforms 4 \
        --json /tmp/logs/bench-cli-batch4.json > /tmp/logs/bench-cli-batch4.log 2>&1; \
      $BENCH_CLI_DDIM200; \
      python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-fp16 --device cuda --runs 1 --backend ort-trt \
        > /tmp/logs/bench-cli-ort-trt.log 2>&1; echo \"exit status \$?\" >> /tmp/logs/bench-cli-ort-trt.log; \
      cd $ROOT/scripts; python3 benchmark.py --fp16 /tmp/art-fp16 --runs 10 \
        --skip b0,b1,b2,fp32,fp16_host_loop,fp16_nograph,fp16_notf32 --out /tmp/logs > /tmp/logs/bench.log 2>&1" ;;
  all-bench)  # setup, the fp16 export, bench
    setup_export_then "16" bench ;;
  two-gpu)  # (2+ GPUs, Ray wheels) after the fp16 export: placement on cuda:1, then the Ray 1- and 2-replica levels
    in_background "bash $SELF wait 16; \
      python3 multi_gpu.py placement --artifacts /tmp/art-fp16 --out /tmp/logs > /tmp/logs/multi_placement.log 2>&1; \
      $RAY_LEVELS" ;;
  all-two-gpu)  # setup, the fp16 export, two-gpu
    setup_export_then "16" two-gpu ;;
  ray)  # (2+ GPUs, Ray wheels) after the fp16 export: only the Ray 1- and 2-replica levels, profiled
    in_background "bash $SELF wait 16; \
      $RAY_LEVELS" ;;
  unet)  # after the fp16 and fp32 exports: UNet recipes, then validate, benchmark, fidelity and profile of the default
    in_background "bash $SELF wait 32; \
      python3 ort_sweep.py --unet-recipes --fp32 /tmp/art-fp32 --out /tmp/logs > /tmp/logs/unet_recipes.log 2>&1; \
      bash $SELF wait 16; \
      $VALIDATE16; \
      $BENCH_WITH_PEERS; \
      $FIDELITY; \
      python3 profile_kernels.py --artifacts /tmp/art-fp16 --out /tmp/logs > /tmp/logs/kernels.log 2>&1" ;;
  all-unet)  # setup, the fp16 and fp32 exports, unet
    setup_export_then "16 32" unet ;;
  check-ray)  # after the fp16 export: validate, fidelity, benchmark (B0 and the runtime), then the Ray levels
    in_background "bash $SELF wait 16; \
      $VALIDATE16; \
      $FIDELITY; \
      python3 benchmark.py --fp16 /tmp/art-fp16 --runs 10 --skip b1,b2,fp32,fp16_nograph,fp16_notf32 \
        --out /tmp/logs > /tmp/logs/bench.log 2>&1; \
      $RAY_LEVELS" ;;
  all-check-ray)  # setup, the fp16 export, check-ray
    setup_export_then "16" check-ray ;;
  sdpa)  # after the fp16 and fp32 exports: attention kernels of the UNet (cold first run, step, error)
    export SDPA_OPTS='{"unet": {"sdpa_kernel": 0}}'  # ORT's choice (cuDNN first on Hopper); the default is 19
    in_background "bash $SELF wait 16 32; \
      python3 ort_sweep.py --fp16 /tmp/art-fp16 --fp32 /tmp/art-fp32 --components unet \
        --variants default,sdpa_flash_efficient,sdpa_efficient,sdpa_cudnn --out /tmp/logs > /tmp/logs/sweep.log 2>&1; \
      python3 benchmark.py --fp16 /tmp/art-fp16 --provider-options \"\$SDPA_OPTS\" --runs 10 \
        --skip b1,b2,fp32,fp16_nograph,fp16_notf32 --out /tmp/logs > /tmp/logs/bench.log 2>&1; \
      python3 fidelity.py --fp16 /tmp/art-fp16 --provider-options \"\$SDPA_OPTS\" --out /tmp/logs \
        > /tmp/logs/fidelity.log 2>&1" ;;
  all-sdpa)  # setup, the fp16 and fp32 exports, sdpa
    setup_export_then "16 32" sdpa ;;
  cold)  # after the fp16 export: cold start in clean processes (variants interleaved, twice), then validate
    in_background "bash $SELF wait 16; \
      python3 cold_start.py --artifacts /tmp/art-fp16 --variants ${COLD_VARIANTS:-default,sequential,seq_disable,cache_write,cache_read,conv_heuristic_uv} \
        --repeat 2 --out /tmp/logs > /tmp/logs/cold.log 2>&1; \
      $VALIDATE16" ;;
  conv-search)  # after the fp16 and fp32 exports: the vocoder's cuDNN algorithm search swept (the runtime's exhaustive
                # search, heuristic, none: first run, warm time, rel-L2 against fp32), then cold start with each
    in_background "bash $SELF wait 16 32; \
      python3 ort_sweep.py --fp16 /tmp/art-fp16 --fp32 /tmp/art-fp32 --runtime-defaults --components vocoder \
        --variants default,heuristic,default_search --out /tmp/logs > /tmp/logs/sweep.log 2>&1; \
      python3 cold_start.py --artifacts /tmp/art-fp16 --variants default,voc_default_search,voc_heuristic \
        --repeat 2 --out /tmp/logs > /tmp/logs/cold.log 2>&1" ;;
  all-conv-search)  # setup, the fp16 and fp32 exports, conv-search
    setup_export_then "16 32" conv-search ;;
  all-cold)  # setup, the fp16 export, cold
    setup_export_then "16" cold ;;
  final)  # after the fp16 and fp32 exports: validate, `audioldm2-trt bench`, cold start in clean processes (UNROLLED=1: also with the
          # unrolled GPT-2 graph; PROFILE=1: then the kernel profile), the ranking features' timing, peak memory of
          # the runtime and B0 in fresh processes (PEAKMEM=0: not), the full benchmark (the default with the device
          # loop first in its process, fp32, the host loop, B0, B1, B2), fidelity
    mkdir -p /tmp/logs/tiny
    export LOOP_CHECK=${LOOP_CHECK:-1}  # 0: without the device-vs-host loop checks
    in_background "[ $LOOP_CHECK = 1 ] && python3 device_loop_check.py --out /tmp/logs/tiny > /tmp/logs/loop_tiny.log 2>&1; \
      bash $SELF wait 16; \
      $VALIDATE16; \
      $BENCH_CLI; \
      [ $LOOP_CHECK = 1 ] && python3 device_loop_check.py --artifacts /tmp/art-fp16 --out /tmp/logs > /tmp/logs/loop_full.log 2>&1; \
      python3 cold_start.py --artifacts /tmp/art-fp16 \
        --variants ${COLD_VARIANTS:-default,sequential,arena_same,host_loop} \
        --repeat 2 --out /tmp/logs > /tmp/logs/cold.log 2>&1; \
      [ ${UNROLLED:-0} = 1 ] && python3 gpt2_graph_variant.py --artifacts /tmp/art-fp16 --graph unrolled \
        --out /tmp/art-fp16-unrolled > /tmp/logs/unrolled.log 2>&1 && mkdir -p /tmp/logs/unrolled && \
        python3 cold_start.py --artifacts /tmp/art-fp16-unrolled --variants default,sequential --repeat 2 \
        --out /tmp/logs/unrolled >> /tmp/logs/unrolled.log 2>&1; \
      [ ${PROFILE:-0} = 1 ] && python3 profile_kernels.py --artifacts /tmp/art-fp16 \
        --components t5_encoder,gpt2,clap_text,clap_audio,unet,vocoder --out /tmp/logs > /tmp/logs/kernels.log 2>&1; \
      python3 features_timing.py --rows 4 --artifacts /tmp/art-fp16 > /tmp/logs/features.log 2>&1; \
      [ ${PEAKMEM:-1} = 1 ] && python3 peak_memory.py --artifacts /tmp/art-fp16 --out /tmp/logs > /tmp/logs/peakmem.log 2>&1; \
      bash $SELF wait 32; \
      $BENCH_WITH_PEERS; \
      $FIDELITY" ;;
  all-final)  # setup, the fp16 and fp32 exports, final
    setup_export_then "16 32" final ;;
  memory)  # after the fp16 and fp32 exports started: while they run, a tiny fp16 export and where its GPU memory goes
           # (cold_start.py's anatomy variants); then validate, the UNet / VAE / vocoder options swept from the
           # runtime's own (fuse_conv_bias), the anatomy at full size, peak memory (the runtime with and without
           # ranking, B0), the full benchmark with a fuse_conv_bias row, fidelity
    mkdir -p /tmp/logs/tiny
    export BENCH_OPTIONS='{"unet": {"fuse_conv_bias": 1}, "vae_decoder": {"fuse_conv_bias": 1}, "vocoder": {"fuse_conv_bias": 1}}'
    ANATOMY=sequential,no_graphs,eager_modules,cublas_small_ws,no_ranking,init_outside_arena
    in_background "(cd /tmp && python3 -m audioldm2_trt.cli export --random-weights tiny --precision fp16 \
        --out /tmp/art-tiny16 --overwrite > /tmp/logs/export_tiny.log 2>&1) && \
      python3 cold_start.py --artifacts /tmp/art-tiny16 --variants $ANATOMY --repeat 1 --out /tmp/logs/tiny \
        > /tmp/logs/anatomy_tiny.log 2>&1; \
      bash $SELF wait 16 32; \
      $VALIDATE16; \
      python3 ort_sweep.py --fp16 /tmp/art-fp16 --fp32 /tmp/art-fp32 --runtime-defaults --variants default,fuse_conv_bias \
        --out /tmp/logs > /tmp/logs/sweep.log 2>&1; \
      python3 cold_start.py --artifacts /tmp/art-fp16 --variants $ANATOMY --repeat 1 --out /tmp/logs \
        > /tmp/logs/cold.log 2>&1; \
      python3 peak_memory.py --artifacts /tmp/art-fp16 --which runtime,runtime_no_ranking,b0 --out /tmp/logs \
        > /tmp/logs/peakmem.log 2>&1; \
      $BENCH_WITH_PEERS; \
      $FIDELITY" ;;
  all-memory)  # setup, the fp16 and fp32 exports, memory
    setup_export_then "16 32" memory ;;
  all-cublas)  # with ~11 minutes of device time: setup, the fp16 export in the foreground, then peak memory (the
               # runtime with and without ranking), cold start (the default, cuBLAS's own workspace, fused conv bias
               # in the UNet), validate, the runtime's benchmark with a fused-conv-bias row; $OUT/logs.tar after each
    t0=$SECONDS
    setup_export_foreground audioldm2 /tmp/art-fp16 /tmp/logs/export16.log
    cd "$ROOT/scripts"
    python3 peak_memory.py --artifacts /tmp/art-fp16 --which runtime,runtime_no_ranking --out /tmp/logs \
      > /tmp/logs/peakmem.log 2>&1; echo "peak_memory rc $? at $((SECONDS - t0)) s"; tar -C /tmp -cf "$OUT/logs.tar" logs
    python3 cold_start.py --artifacts /tmp/art-fp16 --variants sequential,cublas_default_ws,fuse_unet --repeat 1 \
      --out /tmp/logs > /tmp/logs/cold.log 2>&1; echo "cold_start rc $? at $((SECONDS - t0)) s"; tar -C /tmp -cf "$OUT/logs.tar" logs
    $VALIDATE16; echo "validate rc $? at $((SECONDS - t0)) s"; tar -C /tmp -cf "$OUT/logs.tar" logs
    python3 benchmark.py --fp16 /tmp/art-fp16 --runs 10 --skip b0,b1,b2,fp32,fp16_host_loop,fp16_nograph,fp16_notf32 \
      --provider-options '{"unet": {"fuse_conv_bias": 1}}' --out /tmp/logs > /tmp/logs/bench.log 2>&1
    echo "benchmark rc $? at $((SECONDS - t0)) s"; tar -C /tmp -cf "$OUT/logs.tar" logs; tail -n 3 /tmp/logs/*.log ;;
  load)  # after the fp16 export: the one-GPU load test (micro-batcher on and off; two runtimes from two threads)
    in_background "bash $SELF wait 16; \
      python3 load_test.py --artifacts /tmp/art-fp16 --device cuda --out /tmp/logs ${LOAD_ARGS:-} > /tmp/logs/load.log 2>&1" ;;
  all-load)  # setup, the fp16 export, load
    setup_export_then "16" load ;;
  all-ray)  # setup, the fp16 export, ray
    setup_export_then "16" ray ;;
  all-multi)  # setup, the fp16 and plain fp16 exports, the multi-GPU runs, in the background
    setup_export_then "16 16p" multi ;;
  short)  # the fp16 export (fused, the default) takes about 7 minutes on the 16-core machine
    t0=$SECONDS
    setup_export_foreground audioldm2 /tmp/art-fp16 /tmp/logs/export16.log
    SKIP=b1,b2,fp16_nograph bash "$SELF" measure
    bash "$SELF" collect $(( $2 - (SECONDS - t0) )) ;;
  loop-handoff)  # after the fp16 export: the device loop's steps on the UNet's worker in one hand-off (the default since
                 # run AH) against one hand-off a step and against that with the solver step uncaptured (step_overhead.py,
                 # one process, requests interleaved), the device loop against the host loop, bench (DPM-20, DDIM-200),
                 # the 100-prompt fidelity
    in_background "bash $SELF wait 16; \
      $LOOP_CHECKS; $BENCH_CLI; $BENCH_CLI_DDIM200; \
      $FIDELITY" ;;
  all-loop-handoff)  # setup, the fp16 export, loop-handoff
    setup_export_then "16" loop-handoff ;;
  solver-graph)  # after the fp16 export: the solver step captured (the default since run AG) against uncaptured
                 # (step_overhead.py, one process, requests interleaved), the device loop against the host loop on the
                 # full-size artefacts, the bench command (DPM-20, DDIM-200), then benchmark.py with the peers (no fp32)
    in_background "bash $SELF wait 16; \
      $LOOP_CHECKS; $BENCH_CLI; $BENCH_CLI_DDIM200; \
      python3 benchmark.py --fp16 /tmp/art-fp16 --runs 10 --skip fp32,fp16_host_loop,fp16_nograph,fp16_notf32 \
        --out /tmp/logs > /tmp/logs/bench.log 2>&1" ;;
  all-solver-graph)  # setup, the fp16 export, solver-graph
    setup_export_then "16" solver-graph ;;
  overhead)  # with little device time: setup, the tiny fp16 export, then step_overhead.py on it (host time between
             # GPU work in the denoising loop and the text stage; host overheads barely depend on the model's size),
             # in the foreground, logs and results into $OUT/logs.tar
    t0=$SECONDS
    setup_export_foreground tiny /tmp/art-tiny16 /tmp/logs/export_tiny.log
    cd "$ROOT/scripts"
    python3 step_overhead.py --artifacts /tmp/art-tiny16 --out /tmp/logs > /tmp/logs/overhead.log 2>&1
    echo "step_overhead rc $? at $((SECONDS - t0)) s"; tail -60 /tmp/logs/overhead.log
    tar -C /tmp -cf "$OUT/logs.tar" logs ;;
  ownbuffers)  # with little device time, in the foreground: setup, the tiny fp16 export, then the decode stage's
              # captured sessions on the shared arena (shared_arena_check.py --decode-arena --waveforms 2, one trial
              # a process) with the runtime's buffers in memory of its own (the default since run BI) and, alternating,
              # from ONNX Runtime's Python allocator (--python-buffers: the shared arena, as in runs BA-BI); then the
              # decode stage uncaptured on the arena with its own buffers (2 repeats); logs into $OUT/logs.tar
    t0=$SECONDS
    setup_export_foreground tiny /tmp/art-tiny16 /tmp/logs/export_tiny.log
    cd "$ROOT/scripts"
    mkdir -p /tmp/logs/own /tmp/logs/python /tmp/logs/decode-own
    for t in 1 2 3; do for b in own python; do
      flag=; [ $b = python ] && flag=--python-buffers
      timeout 120 python3 shared_arena_check.py --artifacts /tmp/art-tiny16 --request tiny --decode-arena --waveforms 2 \
        $flag --out /tmp/logs/$b/$t > /tmp/logs/$b-$t.log 2>&1
      echo "$b $t rc $? at $((SECONDS - t0)) s: $(grep -h worst_against_alone /tmp/logs/$b-$t.log | head -1)"
    done; done
    timeout 200 python3 shared_arena_check.py --artifacts /tmp/art-tiny16 --request tiny --decode-arena-uncaptured \
      --repeat 2 --out /tmp/logs/decode-own > /tmp/logs/decode-own.log 2>&1
    echo "decode-own rc $? at $((SECONDS - t0)) s"; grep -h worst /tmp/logs/decode-own.log | head -4
    tar -C /tmp -cf "$OUT/logs.tar" logs ;;
  ownbuffers-speed)  # with little device time, in the foreground: setup, the tiny fp16 export, $OWN_BUFFERS_BENCH on it
    t0=$SECONDS
    setup_export_foreground tiny /tmp/art-tiny16 /tmp/logs/export_tiny.log
    ART=/tmp/art-tiny16 bash -c "$OWN_BUFFERS_BENCH"
    echo "bench done at $((SECONDS - t0)) s"; grep -h "end to end\|stages" /tmp/logs/bench-*.log
    tar -C /tmp -cf "$OUT/logs.tar" logs ;;
  smoke)  # with little device time: setup, the tiny fp16 export, then validate, cold start (default and
           # init_outside_arena), the ranking features' timing, the runtime's peak memory and its benchmark on it, in the
           # foreground, logs and results into $OUT/logs.tar. Checks that these scripts run on CUDA; tiny-config
           # figures are no benchmark of the product
    t0=$SECONDS
    setup_export_foreground tiny /tmp/art-tiny16 /tmp/logs/export_tiny.log
    cd /tmp && python3 -m audioldm2_trt.cli validate /tmp/art-tiny16 --device cuda > /tmp/logs/validate_tiny.log 2>&1
    echo "validate rc $? at $((SECONDS - t0)) s"
    cd "$ROOT/scripts"
    python3 cold_start.py --artifacts /tmp/art-tiny16 --variants default,init_outside_arena --repeat 1 \
      --out /tmp/logs/cold > /tmp/logs/cold.log 2>&1; echo "cold_start rc $? at $((SECONDS - t0)) s"
    python3 features_timing.py --rows 4 --artifacts /tmp/art-tiny16 > /tmp/logs/features.log 2>&1
    echo "features_timing rc $?"
    python3 peak_memory.py --artifacts /tmp/art-tiny16 --which runtime --calls 2 --out /tmp/logs/peak \
      > /tmp/logs/peakmem.log 2>&1; echo "peak_memory rc $? at $((SECONDS - t0)) s"
    python3 benchmark.py --fp16 /tmp/art-tiny16 --runs 3 --skip b0,b1,b2,fp32,fp16_host_loop,fp16_nograph,fp16_notf32 \
      --out /tmp/logs/bench > /tmp/logs/bench.log 2>&1; echo "benchmark rc $? at $((SECONDS - t0)) s"
    tar -C /tmp -cf "$OUT/logs.tar" logs; tail -n 4 /tmp/logs/*.log ;;
  splitgelu)  # while the fp16 export runs: the UNet with BiasSplitGelu (unet_variant.py splitgelu); then its UNet
              # validated, bench default vs variant alternating (twice each), its kernels and the 100-prompt fidelity
    in_background "python3 unet_variant.py --artifacts /tmp/art-fp16 --source random:audioldm2 --variant splitgelu \
        --out /tmp/art-sg > /tmp/logs/variant.log 2>&1; \
      bash $SELF wait 16; \
      (cd /tmp && python3 -m audioldm2_trt.cli validate /tmp/art-sg --device cuda --components unet \
        > /tmp/logs/validate-sg.log 2>&1); \
      for r in 1 2; do for v in fp16 sg; do (cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-\$v \
        --device cuda --runs 20 --json /tmp/logs/bench-\$v-\$r.json > /tmp/logs/bench-\$v-\$r.log 2>&1); done; done; \
      python3 profile_kernels.py --artifacts /tmp/art-sg --top 40 --components unet --out /tmp/logs/kernels-sg \
        > /tmp/logs/kernels-sg.log 2>&1; \
      python3 fidelity.py --fp16 /tmp/art-sg --out /tmp/logs/sg > /tmp/logs/fidelity-sg.log 2>&1" ;;
  all-splitgelu)  # setup, the fp16 export and splitgelu at once
    bash "$SELF" setup || exit 1
    bash "$SELF" export 16 && bash "$SELF" splitgelu ;;
  foldbias)  # while the fp16 export runs (the default: biases folded, export/fold_bias.py): the UNet without the fold
             # (unet_variant.py nofold, the default before); then the default validated, bench default vs variant
             # alternating (three rounds), both UNets' kernels (and the VAE's), the default's 100-prompt fidelity
    in_background "python3 unet_variant.py --artifacts /tmp/art-fp16 --source random:audioldm2 --variant nofold \
        --out /tmp/art-nofold > /tmp/logs/variant.log 2>&1; \
      bash $SELF wait 16; \
      $VALIDATE16; \
      for r in 1 2 3; do for v in fp16 nofold; do (cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-\$v \
        --device cuda --runs 20 --json /tmp/logs/bench-\$v-\$r.json > /tmp/logs/bench-\$v-\$r.log 2>&1); done; done; \
      python3 profile_kernels.py --artifacts /tmp/art-fp16 --top 40 --components unet,vae_decoder \
        --out /tmp/logs/kernels-fold > /tmp/logs/kernels-fold.log 2>&1; \
      python3 profile_kernels.py --artifacts /tmp/art-nofold --top 40 --components unet \
        --out /tmp/logs/kernels-nofold > /tmp/logs/kernels-nofold.log 2>&1; \
      $FIDELITY" ;;
  all-foldbias)  # setup, the fp16 export and foldbias at once
    bash "$SELF" setup || exit 1
    bash "$SELF" export 16 && bash "$SELF" foldbias ;;
  padgeglu)  # the default (every GEGLU as BiasSplitGelu, the narrower ones widened) against unet_variant.py nopad
    variant_ab nopad ;;
  lnfold)  # the default (each proj_in bias and norm1 as one SkipLayerNormalization, fold_bias.py's third rewrite)
           # against unet_variant.py nolnfold
    variant_ab nolnfold ;;
  hoist)  # the default (the UNet's text-only work in a context graph run once per request, hoist_context.py) against
          # unet_variant.py nohoist
    variant_ab nohoist ;;
  tembmerge)  # the default (the ResNets' time-embedding projections as one GEMM and a Split per width, sibling_gemms.py)
              # against unet_variant.py nomerge (22 GEMMs, the default before), with tests/test_gpu.py
    variant_ab nomerge unet "$TEST_GPU" ;;
  clapattn)  # CLAP's text branch with its attention as MultiHeadAttention (the default, CLAP_TEXT_MEA since run CR) against
             # unet_variant.py clap_noattention (CLAP_TEXT_FUSED, the default before), with loop_start_probe.py on each
             # (where the projection starts after T5). Run CN ran this A/B the other way round, at 9a6fd56 (the variant
             # then was clap_attention, the default the unfused attention; no DDIM-200 or kernel profile then).
    variant_ab clap_noattention clap_text "$(probe_steps fp16 clap_noattention)" ;;
  textvoc)  # the default (CLAP_TEXT_MEA, VOCODER_BIAS_ADD since run CR) against unet_variant.py clap_nomea and
            # voc_cudnn_bias (the recipes before), with loop_start_probe.py on the default and clap_nomea. Runs CQ-CR
            # measured this A/B the other way round, with modes of their own (textvoc and textvoc-rest at f846d77)
    variant_ab "clap_nomea voc_cudnn_bias" clap_text,vocoder "$(probe_steps fp16 clap_nomea)" ;;
  biasadds)  # the default against unet_variant.py vae_bias_add (the VAE decoder's convolution biases as Add nodes,
             # NhwcConv included; run CT's conv_bias_probe.py: its graph 0.21 ms shorter) and unet_bias_add (the UNet's
             # 14 biases fold_bias.py leaves, likewise), each variant validated on its component and its 100-prompt
             # fidelity after the default's (the VAE's error sits closest to diffusers fp16's: run AD's fold)
    variant_ab "vae_bias_add unet_bias_add" vae_decoder,unet "for v in vae_bias_add:vae_decoder unet_bias_add:unet; do \
      (cd /tmp && python3 -m audioldm2_trt.cli validate /tmp/art-\${v%%:*} --device cuda --components \${v#*:} \
        > /tmp/logs/validate-\${v%%:*}.log 2>&1); done; \
      for v in vae_bias_add unet_bias_add; do mkdir -p /tmp/logs/fidelity-\$v; python3 fidelity.py --fp16 /tmp/art-\$v \
        --out /tmp/logs/fidelity-\$v > /tmp/logs/fidelity-\$v.log 2>&1; done" ;;
  latents)  # after the fp16 export started (the default since run CN: CLAP's attention as MultiHeadAttention):
            # tests/test_gpu.py while it runs; then validate, loop_start_probe.py alternating over three rounds with
            # the initial latents drawn while GPT-2's passes run (the default since run CO) and after the text stage
            # (--latents-after-text, before), `bench` three rounds, the kernel profile of every component
    in_background "$TEST_GPU; \
      bash $SELF wait 16; \
      $VALIDATE16; \
      for r in 1 2 3; do for v in overlap after; do o=; [ \$v = after ] && o=--latents-after-text; \
        python3 loop_start_probe.py --artifacts /tmp/art-fp16 --requests 20 \$o --out /tmp/logs/probe-\$v-\$r \
          > /tmp/logs/probe-\$v-\$r.log 2>&1; done; done; \
      for r in 1 2 3; do (cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-fp16 --device cuda --runs 20 \
        --json /tmp/logs/bench-\$r.json > /tmp/logs/bench-\$r.log 2>&1); done; \
      python3 profile_kernels.py --artifacts /tmp/art-fp16 --top 40 --out /tmp/logs/kernels > /tmp/logs/kernels.log 2>&1" ;;
  gpt2fuse)  # the default (GPT-2 fused: SkipLayerNormalization, FastGelu, MultiHeadAttention; self_attention.py)
             # against unet_variant.py gpt2_plain (GPT-2 converted without fusion, the default before)
    variant_ab gpt2_plain gpt2 ;;
  textfuse)  # the default (T5 and CLAP's text branch fused too: T5_FUSED, CLAP_TEXT_FUSED) against each unfused
             # (unet_variant.py t5_plain, clap_text_plain)
    variant_ab "t5_plain clap_text_plain" t5_encoder,clap_text ;;
  queued)  # after the fp16 export: validate, then the steps queued one ahead (the default since) against each waited
           # for (--queued-steps off): bench alternating over three rounds of 20 calls, DDIM-200 (3 calls) each; the
           # loop checks (step_overhead: default vs step_by_step; device_loop_check: queued = step by step, the host
           # loop, a batch cancelled mid-loop); the 100-prompt fidelity; benchmark.py's runtime rows
    in_background "bash $SELF wait 16; \
      $VALIDATE16; \
      for r in 1 2 3; do for q in on off; do (cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-fp16 \
        --device cuda --runs 20 --queued-steps \$q --json /tmp/logs/bench-\$q-\$r.json > /tmp/logs/bench-\$q-\$r.log 2>&1); \
        done; done; \
      for q in on off; do (cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-fp16 --device cuda \
        --runs 3 --scheduler ddim --steps 200 --queued-steps \$q --json /tmp/logs/ddim200-\$q.json \
        > /tmp/logs/ddim200-\$q.log 2>&1); done; \
      python3 device_loop_check.py --artifacts /tmp/art-fp16 --out /tmp/logs > /tmp/logs/loopcheck.log 2>&1; \
      python3 step_overhead.py --artifacts /tmp/art-fp16 --variants default,step_by_step --rounds 10 --out /tmp/logs \
        > /tmp/logs/overhead.log 2>&1; \
      $FIDELITY; \
      python3 benchmark.py --fp16 /tmp/art-fp16 --runs 10 --skip b0,b1,b2,fp32,fp16_nograph,fp16_notf32 \
        --out /tmp/logs/rows > /tmp/logs/rows.log 2>&1" ;;
  lmloop)  # after the fp16 export started: a tiny fp32 export and its vocoder failure narrowed down (runs AS-AT: the
           # vocoder alone through the failing batch shapes with each variant, then the failing script) while the full
           # export runs; then GPT-2's passes on the device (the default since) against on the host: text_stage.py,
           # bench alternating (--lm-loop on|off, 3 rounds of 20 calls), the full benchmark with the peers (no fp32
           # export: its row skipped), peak memory (the runtime, B0), cold start in clean processes, validate, fidelity
    mkdir -p /tmp/logs/tiny
    in_background "(cd /tmp && python3 -m audioldm2_trt.cli export --random-weights tiny --out /tmp/tiny-check \
        --overwrite > /tmp/logs/tiny/export.log 2>&1); \
      for v in default no-graphs heuristic; do mkdir -p /tmp/logs/tiny/voc-\$v; python3 vocoder_shapes_check.py \
        --artifacts /tmp/tiny-check --variant \$v --out /tmp/logs/tiny/voc-\$v > /tmp/logs/tiny/voc-\$v.log 2>&1; done; \
      python3 device_loop_check.py --artifacts /tmp/tiny-check --device cuda --seconds 2 --out /tmp/logs/tiny \
        > /tmp/logs/tiny/loopcheck.log 2>&1; \
      bash $SELF wait 16; \
      python3 text_stage.py --artifacts /tmp/art-fp16 --rounds 30 --out /tmp/logs > /tmp/logs/text_stage.log 2>&1; \
      for r in 1 2 3; do for q in on off; do (cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-fp16 \
        --device cuda --runs 20 --lm-loop \$q --json /tmp/logs/bench-\$q-\$r.json > /tmp/logs/bench-\$q-\$r.log 2>&1); \
        done; done; \
      python3 benchmark.py --fp16 /tmp/art-fp16 --runs 10 --skip fp32,fp16_nograph,fp16_notf32 --out /tmp/logs \
        > /tmp/logs/bench.log 2>&1; \
      python3 peak_memory.py --artifacts /tmp/art-fp16 --out /tmp/logs > /tmp/logs/peakmem.log 2>&1; \
      python3 cold_start.py --artifacts /tmp/art-fp16 --variants default --repeat 2 --out /tmp/logs \
        > /tmp/logs/cold.log 2>&1; \
      $VALIDATE16; \
      $FIDELITY" ;;
  vocfix)  # after the fp32 export started: a tiny fp32 export, its vocoder through the failing batch shapes (three
           # sessions) with fp32's default search (heuristic, since run AU) and the exhaustive one (the default before),
           # then the failing script (device_loop_check.py, three runtimes); after the full-size fp32 export: validate,
           # its vocoder through the same shapes (two sessions, both searches), bench with each search, two rounds
    mkdir -p /tmp/logs/tiny /tmp/logs/full32
    export EXHAUSTIVE='{"vocoder": {"cudnn_conv_algo_search": "EXHAUSTIVE"}}'
    in_background "(cd /tmp && python3 -m audioldm2_trt.cli export --random-weights tiny --out /tmp/tiny-check \
        --overwrite > /tmp/logs/tiny/export.log 2>&1); \
      for v in default exhaustive; do mkdir -p /tmp/logs/tiny/voc-\$v; timeout 300 python3 vocoder_shapes_check.py \
        --artifacts /tmp/tiny-check --variant \$v --out /tmp/logs/tiny/voc-\$v > /tmp/logs/tiny/voc-\$v.log 2>&1; done; \
      timeout 300 python3 device_loop_check.py --artifacts /tmp/tiny-check --device cuda --seconds 2 \
        --out /tmp/logs/tiny > /tmp/logs/tiny/loopcheck.log 2>&1; \
      bash $SELF wait 32; \
      (cd /tmp && python3 -m audioldm2_trt.cli validate /tmp/art-fp32 --device cuda > /tmp/logs/full32/validate.log 2>&1); \
      for r in 1 2; do (cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-fp32 --device cuda --runs 10 \
          --json /tmp/logs/full32/bench-heuristic-\$r.json > /tmp/logs/full32/bench-heuristic-\$r.log 2>&1; \
        python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-fp32 --device cuda --runs 10 \
          --provider-options \"\$EXHAUSTIVE\" --json /tmp/logs/full32/bench-exhaustive-\$r.json \
          > /tmp/logs/full32/bench-exhaustive-\$r.log 2>&1); done; \
      for v in default exhaustive; do mkdir -p /tmp/logs/full32/voc-\$v; timeout 300 python3 vocoder_shapes_check.py \
        --artifacts /tmp/art-fp32 --frames 1024 --sessions 2 --variant \$v --out /tmp/logs/full32/voc-\$v \
        > /tmp/logs/full32/voc-\$v.log 2>&1; done" ;;
  all-vocfix)  # setup, the fp32 export and vocfix at once
    bash "$SELF" setup || exit 1
    bash "$SELF" export 32 && bash "$SELF" vocfix ;;
  textpar)  # after the fp16 export: the text stage three ways in one process (text_stage.py: CLAP run while T5 runs,
            # the default since run AW; CLAP then T5; GPT-2's passes on the host too), bench of the default (3 rounds
            # of 20 calls, each its own process), the loop checks (device_loop_check.py), the load test at 1 and 16
            # clients with its placement checks (two runtimes from two threads, each equal to its result alone)
    in_background "bash $SELF wait 16; \
      python3 text_stage.py --artifacts /tmp/art-fp16 --rounds 40 --out /tmp/logs > /tmp/logs/text_stage.log 2>&1; \
      for r in 1 2 3; do (cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-fp16 --device cuda \
        --runs 20 --json /tmp/logs/bench-\$r.json > /tmp/logs/bench-\$r.log 2>&1); done; \
      python3 device_loop_check.py --artifacts /tmp/art-fp16 --out /tmp/logs > /tmp/logs/loopcheck.log 2>&1; \
      python3 load_test.py --artifacts /tmp/art-fp16 --device cuda --concurrency 1 16 --out /tmp/logs \
        > /tmp/logs/load.log 2>&1" ;;
  wblock)  # after the fp16 and fp32 exports started: the UNet's and VAE decoder's weights in the runtime's own block
           # (backends/weights_block.py, the default since) against one allocation per weight: the audio of both in
           # one process, bench alternating (--weights-block on|off, 3 rounds of 20 calls), peak memory (both, B0),
           # validate, cold start in clean processes; then the full benchmark with the peers and the fp32 row,
           # fidelity
    in_background "bash $SELF wait 16; \
      python3 weights_block_check.py --artifacts /tmp/art-fp16 --out /tmp/logs > /tmp/logs/wbcheck.log 2>&1; \
      for r in 1 2 3; do for q in on off; do (cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-fp16 \
        --device cuda --runs 20 --weights-block \$q --json /tmp/logs/bench-\$q-\$r.json > /tmp/logs/bench-\$q-\$r.log 2>&1); \
        done; done; \
      python3 peak_memory.py --artifacts /tmp/art-fp16 --which runtime,runtime_no_block,b0 --out /tmp/logs \
        > /tmp/logs/peakmem.log 2>&1; \
      $VALIDATE16; \
      python3 cold_start.py --artifacts /tmp/art-fp16 --variants default --repeat 2 --out /tmp/logs \
        > /tmp/logs/cold.log 2>&1; \
      bash $SELF wait 32; \
      $BENCH_WITH_PEERS; \
      $FIDELITY" ;;
  all-wblock)  # setup, the fp16 and fp32 exports, wblock
    setup_export_then "16 32" wblock ;;
  textgraphs)  # after the fp16 and fp32 exports started: tests/test_gpu.py meanwhile (two default runtimes at once
               # among its checks); then peak memory with the once-per-request text sessions run without CUDA graphs
               # (all three, T5 alone, CLAP's text branch and the projection; all three with a 256 KiB cuBLAS
               # workspace) against the default and B0; bench alternating the default, the three uncaptured, and CLAP
               # + projection uncaptured (3 rounds of 20 calls); validate; cold start; the full benchmark with the
               # peers and the fp32 row; fidelity. Audio outside /tmp/logs.
    mkdir -p /tmp/audio
    in_background "$TEST_GPU; \
      bash $SELF wait 16; \
      python3 peak_memory.py --artifacts /tmp/art-fp16 --audio-dir /tmp/audio --which runtime,runtime_text_uncaptured,\
runtime_t5_uncaptured,runtime_clap_proj_uncaptured,runtime_text_uncaptured_ws256k,b0 \
        --out /tmp/logs > /tmp/logs/peakmem.log 2>&1; \
      for r in 1 2 3; do for v in default text clapproj; do \
        case \$v in default) u= ;; text) u=clap_text,t5_encoder,projection ;; clapproj) u=clap_text,projection ;; esac; \
        (cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-fp16 --device cuda --runs 20 \
          \${u:+--uncaptured \$u} --json /tmp/logs/bench-\$v-\$r.json > /tmp/logs/bench-\$v-\$r.log 2>&1); done; done; \
      $VALIDATE16; \
      python3 cold_start.py --artifacts /tmp/art-fp16 --variants default --repeat 2 --out /tmp/logs \
        > /tmp/logs/cold.log 2>&1; \
      bash $SELF wait 32; \
      $BENCH_WITH_PEERS; \
      $FIDELITY" ;;
  all-textgraphs)  # setup, the fp16 and fp32 exports, textgraphs
    setup_export_then "16 32" textgraphs ;;
  noarena)  # after the fp16 export started: tests/test_gpu.py meanwhile; then, at the default since run BF (one ONNX
            # Runtime arena per session: captured sessions may not share one on CUDA), and with the decode stage's
            # sessions uncaptured on the shared arena (what load allows): runtimes driven at once against alone
            # (shared_arena_check.py, full size, 2 repeats each), peak memory of the default, without ranking, the
            # decode stage uncaptured on the arena and off it, and B0; `bench` alternating the default and the decode
            # stage uncaptured on the arena (3 rounds of 20 calls); the load test (placement: two runtimes at once);
            # then the failure reproduced for diagnosis (shared_arena_check.py --decode-arena, 3 processes). First,
            # in a process of its own: do ONNX Runtime's Python OrtValues come from a shared arena
            # (ortvalue_allocator_probe.py)
    mkdir -p /tmp/logs/load /tmp/logs/unsafe /tmp/logs/decode-arena
    in_background "python3 ortvalue_allocator_probe.py --out /tmp/logs > /tmp/logs/probe.log 2>&1; \
      $TEST_GPU; \
      bash $SELF wait 16; \
      python3 shared_arena_check.py --artifacts /tmp/art-fp16 --repeat 2 --out /tmp/logs > /tmp/logs/arenacheck.log 2>&1; \
      python3 shared_arena_check.py --artifacts /tmp/art-fp16 --repeat 2 --decode-arena-uncaptured \
        --out /tmp/logs/decode-arena > /tmp/logs/arenacheck-decode.log 2>&1; \
      python3 peak_memory.py --artifacts /tmp/art-fp16 --which runtime,runtime_no_ranking,\
runtime_decode_arena_uncaptured,runtime_decode_uncaptured,b0 --out /tmp/logs > /tmp/logs/peakmem.log 2>&1; \
      for r in 1 2 3; do for v in default decodearena; do \
        case \$v in default) o= ;; decodearena) o='--shared-arena vae_decoder,vocoder --uncaptured vae_decoder,vocoder' ;; esac; \
        (cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-fp16 --device cuda --runs 20 \$o \
          --json /tmp/logs/bench-\$v-\$r.json > /tmp/logs/bench-\$v-\$r.log 2>&1); done; done; \
      python3 load_test.py --artifacts /tmp/art-fp16 --device cuda --concurrency 1 16 --out /tmp/logs/load \
        > /tmp/logs/load.log 2>&1; \
      for t in 1:1 2:1 3:2; do python3 shared_arena_check.py --artifacts /tmp/art-fp16 --decode-arena \
        --waveforms \${t#*:} --out /tmp/logs/unsafe/\${t%%:*} >> /tmp/logs/unsafe.log 2>&1; done" ;;
  ownbuffers-full)  # after the fp16 export started: at full size, the decode stage's captured sessions on the shared
                   # arena with the runtime's buffers in memory of its own (run BJ's fix, checked on the tiny export
                   # only): shared_arena_check.py --decode-arena, 3 processes with two waveforms and 2 with one, one
                   # control with --python-buffers (the failure of runs BF-BI); the decode stage uncaptured on the arena
                   # (2 repeats); peak memory of the default, the decode stage captured and uncaptured on the arena,
                   # and B0; tests/test_gpu.py while the export runs; last, the benchmark with the peers (no fp32)
    mkdir -p /tmp/logs/own /tmp/logs/python /tmp/logs/decode-own
    in_background "$TEST_GPU; \
      bash $SELF wait 16; \
      for t in 1:2 2:2 3:2 4:1 5:1; do timeout 300 python3 shared_arena_check.py --artifacts /tmp/art-fp16 --decode-arena \
        --waveforms \${t#*:} --out /tmp/logs/own/\${t%%:*} >> /tmp/logs/own.log 2>&1; done; \
      timeout 300 python3 shared_arena_check.py --artifacts /tmp/art-fp16 --decode-arena --waveforms 2 --python-buffers \
        --out /tmp/logs/python/1 >> /tmp/logs/python.log 2>&1; \
      python3 shared_arena_check.py --artifacts /tmp/art-fp16 --repeat 2 --decode-arena-uncaptured \
        --out /tmp/logs/decode-own > /tmp/logs/arenacheck-decode-own.log 2>&1; \
      python3 peak_memory.py --artifacts /tmp/art-fp16 --which runtime,runtime_own_arenas,\
runtime_decode_arena_uncaptured,b0 --out /tmp/logs > /tmp/logs/peakmem.log 2>&1; \
      $OWN_BUFFERS_BENCH; \
      $BENCH_PEERS_FP16" ;;
  defaultarena-full)  # after the fp16 export started: the default since run BN, the decode stage's captured sessions
                     # on the shared arena: tests/test_gpu.py while the export runs; shared_arena_check.py at the
                     # default (its first pair on the arena with two waveforms; the runtimes loaded after keep an
                     # arena per session); `bench` alternating the default and one arena per session (2 rounds of 20
                     # calls); the benchmark with the peers (no fp32 row); last, the load test at the default
    mkdir -p /tmp/logs/check /tmp/logs/load
    in_background "$TEST_GPU; \
      bash $SELF wait 16; \
      timeout 300 python3 shared_arena_check.py --artifacts /tmp/art-fp16 --out /tmp/logs/check > /tmp/logs/check.log 2>&1; \
      for r in 1 2; do for v in default own; do \
        case \$v in default) o= ;; own) o='--shared-arena none' ;; esac; \
        (cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-fp16 --device cuda --runs 20 \$o \
          --json /tmp/logs/bench-\$v-\$r.json > /tmp/logs/bench-\$v-\$r.log 2>&1); done; done; \
      $BENCH_PEERS_FP16; \
      python3 load_test.py --artifacts /tmp/art-fp16 --device cuda --concurrency 1 16 --out /tmp/logs/load \
        > /tmp/logs/load.log 2>&1" ;;
  gemm16)  # after the fp16 export, in the foreground: ONNX Runtime's fp16 GEMMs accumulating in fp16 (its test switch
           # ORT_CUDA_GEMM_OPTIONS=1) against the default (fp32 accumulation): `bench` alternating, two rounds of 20
           # calls, DDIM-200 once each, then the 100-prompt fidelity with it; results in /tmp/logs/gemm16
    mkdir -p /tmp/logs/gemm16
    cd /tmp
    for i in 1 2; do
      for v in default gemm16; do
        env $([ $v = gemm16 ] && echo ORT_CUDA_GEMM_OPTIONS=1) python3 -m audioldm2_trt.cli bench \
          --artifacts /tmp/art-fp16 --device cuda --runs 20 --json /tmp/logs/gemm16/bench-$v-$i.json \
          > /tmp/logs/gemm16/bench-$v-$i.log 2>&1
        echo "$v $i: $(grep -h 'end to end\|stages' /tmp/logs/gemm16/bench-$v-$i.log | tr '\n' ' ')"
      done
    done
    for v in default gemm16; do
      env $([ $v = gemm16 ] && echo ORT_CUDA_GEMM_OPTIONS=1) python3 -m audioldm2_trt.cli bench \
        --artifacts /tmp/art-fp16 --device cuda --runs 3 --scheduler ddim --steps 200 \
        --json /tmp/logs/gemm16/ddim200-$v.json > /tmp/logs/gemm16/ddim200-$v.log 2>&1
      echo "$v DDIM-200: $(grep -h 'end to end' /tmp/logs/gemm16/ddim200-$v.log)"
    done
    cd "$ROOT/scripts" && ORT_CUDA_GEMM_OPTIONS=1 python3 fidelity.py --fp16 /tmp/art-fp16 --out /tmp/logs/gemm16 \
      > /tmp/logs/gemm16/fidelity.log 2>&1
    tail -n 4 /tmp/logs/gemm16/fidelity.log
    # one file back: the device tool returns at most 8 files a call (run CC lost its DDIM-200 and fidelity files so)
    [ -n "${OUT:-}" ] && tar -C /tmp/logs -czf "$OUT/gemm16.tgz" gemm16 ;;
  bench-as)  # bench-as VARIANT FILE [bench options...]: `audioldm2-trt bench` on the fp16 artefacts, on CUDA, in a
             # process of its own, at one of the configurations below → /tmp/logs/FILE.json and FILE.log
    variant=$2 file=$3
    shift 3
    case $variant in
      default) workspace= options= ;;  # load's defaults
      ws256k) workspace=:256:1 options= ;;  # the 256 KiB cuBLAS workspace (the default since run BP)
      both) workspace=:256:1 options="--uncaptured clap_text,projection" ;;  # the default since run BP, by its options
      bn) workspace=:1024:1 options="--uncaptured none" ;;  # the default of runs BN-BP: every session captured, 1 MiB
      *) echo "bench-as: unknown variant $variant (default, ws256k, both, bn)" >&2; exit 2 ;;
    esac
    cd /tmp && env ${workspace:+CUBLAS_WORKSPACE_CONFIG=$workspace} python3 -m audioldm2_trt.cli bench \
      --artifacts /tmp/art-fp16 --device cuda $options "$@" --json /tmp/logs/$file.json > /tmp/logs/$file.log 2>&1 ;;
  memline-full)  # after the fp16 export started: tests/test_gpu.py while it runs; peak memory (fresh processes) of the
                # default, the 256 KiB cuBLAS workspace, CLAP's text branch and the projection uncaptured, both, and B0;
                # `bench` alternating the default, 256 KiB, and 256 KiB with the two uncaptured (3 rounds of 20 calls),
                # then batch 4 (--waveforms 4) for the default and 256 KiB; the 100-prompt fidelity and cold start in
                # clean processes at the default (what runs BN-BO left out)
    in_background "$TEST_GPU; \
      bash $SELF wait 16; \
      python3 peak_memory.py --artifacts /tmp/art-fp16 --which runtime,runtime_ws256k,runtime_clap_proj_uncaptured,\
runtime_clap_proj_uncaptured_ws256k,b0 --out /tmp/logs > /tmp/logs/peakmem.log 2>&1; \
      for r in 1 2 3; do for v in default ws256k both; do bash $SELF bench-as \$v bench-\$v-\$r --runs 20; done; done; \
      for v in default ws256k; do bash $SELF bench-as \$v bench4-\$v --runs 10 --waveforms 4; done; \
      python3 cold_start.py --artifacts /tmp/art-fp16 --variants default --repeat 2 --out /tmp/logs > /tmp/logs/cold.log 2>&1; \
      $FIDELITY" ;;
  newdefault-full)  # after the fp16 export started: the default since run BP (CLAP's text branch and the projection
                    # uncaptured, 256 KiB cuBLAS workspace) in its own right: tests/test_gpu.py while the export runs;
                    # peak memory (fresh processes) of the default, the default of runs BN-BP and B0; `bench`
                    # alternating the default and every session captured with 1 MiB (3 rounds of 20 calls); batch 4;
                    # cold start in clean processes; the 100-prompt fidelity; last, the benchmark with the peers
    in_background "$TEST_GPU; \
      bash $SELF wait 16; \
      python3 peak_memory.py --artifacts /tmp/art-fp16 --which runtime,runtime_bn_default,b0 --out /tmp/logs \
        > /tmp/logs/peakmem.log 2>&1; \
      for r in 1 2 3; do for v in default bn; do bash $SELF bench-as \$v bench-\$v-\$r --runs 20; done; done; \
      bash $SELF bench-as default bench4 --runs 10 --waveforms 4; \
      python3 cold_start.py --artifacts /tmp/art-fp16 --variants default --repeat 2 --out /tmp/logs > /tmp/logs/cold.log 2>&1; \
      $FIDELITY; \
      $BENCH_PEERS_FP16" ;;
  all-newdefault-full)  # setup, the fp16 export, newdefault-full
    setup_export_then 16 newdefault-full ;;
  peers)  # after the fp16 export: only the benchmark with the peers (B0, B1, B2 and the runtime at its default in one
         # process); what run BS's machine took with it
    in_background "bash $SELF wait 16; $BENCH_PEERS_FP16" ;;
  all-peers)  # setup, the fp16 export, peers
    setup_export_then 16 peers ;;
  fp32row)  # after the fp16 and fp32 exports: peak memory (fresh processes) of the default, the default without
           # ranking and B0 (PEAKMEM=0: not); then the full benchmark with the peers and the fp32 row (B0, B1, B2,
           # fp16 with its device loop and with the host loop, fp32), one process; what runs BS-BT left due
    in_background "bash $SELF wait 16 32; \
      [ ${PEAKMEM:-1} = 1 ] && python3 peak_memory.py --artifacts /tmp/art-fp16 --which runtime,runtime_no_ranking,b0 \
        --out /tmp/logs > /tmp/logs/peakmem.log 2>&1; \
      $BENCH_WITH_PEERS" ;;
  all-fp32row)  # setup, the fp16 and fp32 exports, fp32row
    setup_export_then "16 32" fp32row ;;
  current)  # after the fp16 and fp32 exports started: the issue's whole table at the current default. tests/test_gpu.py
           # while they run; then validate, `bench` (20 warm calls), DDIM-200, batch 4, decode_overhead.py, the
           # kernels of the vocoder, CLAP's text branch and the VAE decoder, loop_start_probe.py, peak memory of the
           # runtime and B0 (fresh processes); after the fp32 export the benchmark with the peers and the fp32 row in
           # one process; the 100-prompt fidelity last
    in_background "$TEST_GPU; \
      bash $SELF wait 16; \
      $VALIDATE16; \
      $BENCH_CLI; \
      $BENCH_CLI_DDIM200; \
      (cd /tmp && python3 -m audioldm2_trt.cli bench --artifacts /tmp/art-fp16 --device cuda --runs 10 --waveforms 4 \
        --json /tmp/logs/bench-cli-batch4.json > /tmp/logs/bench-cli-batch4.log 2>&1); \
      python3 decode_overhead.py --artifacts /tmp/art-fp16 --out /tmp/logs > /tmp/logs/decode.log 2>&1; \
      python3 profile_kernels.py --artifacts /tmp/art-fp16 --top 40 --components vocoder,clap_text,vae_decoder \
        --out /tmp/logs/kernels > /tmp/logs/kernels.log 2>&1; \
      $(probe_steps fp16); \
      python3 peak_memory.py --artifacts /tmp/art-fp16 --which runtime,b0 --out /tmp/logs > /tmp/logs/peakmem.log 2>&1; \
      bash $SELF wait 32; \
      $BENCH_WITH_PEERS; \
      $FIDELITY" ;;
  all-current)  # setup, the fp16 and fp32 exports, current
    setup_export_then "16 32" current ;;
  memline-rest)  # after the fp16 export started: what run BP's machine took with it: batch 4 (--waveforms 4) for the
                # default and for the 256 KiB workspace with CLAP's text branch and the projection uncaptured; `bench`
                # round 3 of the 256 KiB workspace, of both savings and of the default; the cold start and the
                # 100-prompt fidelity in clean processes at the default
    in_background "bash $SELF wait 16; \
      for v in default both; do bash $SELF bench-as \$v bench4-\$v --runs 10 --waveforms 4; done; \
      for v in ws256k both default; do bash $SELF bench-as \$v bench-\$v-3 --runs 20; done; \
      python3 cold_start.py --artifacts /tmp/art-fp16 --variants default --repeat 2 --out /tmp/logs > /tmp/logs/cold.log 2>&1; \
      $FIDELITY" ;;
  all-memline-rest)  # setup, the fp16 export, memline-rest
    setup_export_then 16 memline-rest ;;
  all-memline-full)  # setup, the fp16 export, memline-full
    setup_export_then 16 memline-full ;;
  all-defaultarena-full)  # setup, the fp16 export, defaultarena-full
    setup_export_then 16 defaultarena-full ;;
  all-ownbuffers-full)  # setup, the fp16 export, ownbuffers-full
    setup_export_then 16 ownbuffers-full ;;
  all-noarena)  # setup, the fp16 export, noarena
    setup_export_then 16 noarena ;;
  all-padgeglu|all-lnfold|all-hoist|all-tembmerge|all-clapattn|all-textvoc|all-biasadds|all-latents|all-gpt2fuse|all-textfuse|all-queued|all-lmloop|all-textpar)  # setup, the fp16 export and the mode at once
    bash "$SELF" setup || exit 1
    bash "$SELF" export 16 && bash "$SELF" "${1#all-}" ;;
  loopstart)  # after the fp16 export started: loop_start_probe.py (the calls between the text stage and the waveform,
             # timed) on a tiny fp16 export while it runs, then on the full-size one, 20 requests each
    in_background "(cd /tmp && python3 -m audioldm2_trt.cli export --random-weights tiny --precision fp16 \
        --out /tmp/art-tiny16 --overwrite > /tmp/logs/export_tiny.log 2>&1) && \
      python3 loop_start_probe.py --artifacts /tmp/art-tiny16 --requests 20 --out /tmp/logs/tiny \
        > /tmp/logs/loopstart-tiny.log 2>&1; \
      bash $SELF wait 16; \
      python3 loop_start_probe.py --artifacts /tmp/art-fp16 --requests 20 --out /tmp/logs \
        > /tmp/logs/loopstart.log 2>&1" ;;
  all-loopstart)  # setup, the fp16 export, loopstart
    setup_export_then 16 loopstart ;;
  abloop)  # after the fp16 export started: tests/test_gpu.py while it runs; then loop_start_probe.py (20 requests)
           # alternating an older runtime — a copy of runtime/ at ab_old/runtime, e.g. `git archive REV runtime | tar -x
           # -C ab_old` (untracked) — and this one, 2 rounds, on the same artefacts
    mkdir -p /tmp/pkg_old/audioldm2_trt
    cp "$ROOT"/audioldm2_trt/*.py /tmp/pkg_old/audioldm2_trt/
    ln -sfn "$ROOT/export" /tmp/pkg_old/audioldm2_trt/export
    ln -sfn "$ROOT/ab_old/runtime" /tmp/pkg_old/audioldm2_trt/runtime
    ln -sfn /tmp/pkg /tmp/pkg_new
    in_background "$TEST_GPU; \
      bash $SELF wait 16; \
      for r in 1 2; do for v in old new; do PYTHONPATH=/tmp/site:/tmp/pkg_\$v python3 loop_start_probe.py \
        --artifacts /tmp/art-fp16 --requests 20 --out /tmp/logs/\$v-\$r > /tmp/logs/loopstart-\$v-\$r.log 2>&1; \
      done; done" ;;
  all-abloop)  # setup, the fp16 export, abloop
    setup_export_then 16 abloop ;;
  profile)  # after the fp16 export: every component's kernels by category and name (profile_kernels.py, 40 listed)
    in_background "bash $SELF wait 16; \
      python3 profile_kernels.py --artifacts /tmp/art-fp16 --top 40 \
        --components unet,vocoder,vae_decoder,t5_encoder,gpt2,clap_text,clap_audio,clap_features \
        --out /tmp/logs > /tmp/logs/kernels.log 2>&1" ;;
  profile-merge)  # after the fp16 export started: unet_variant.py nomerge beside it, then every component's kernels at
                  # the default and the UNet's without sibling_gemms.py (the default before run CK)
    in_background "python3 unet_variant.py --artifacts /tmp/art-fp16 --source random:audioldm2 --variant nomerge \
        --out /tmp/art-nomerge > /tmp/logs/variant.log 2>&1; \
      bash $SELF wait 16; \
      python3 profile_kernels.py --artifacts /tmp/art-fp16 --top 40 \
        --components unet,vocoder,vae_decoder,t5_encoder,gpt2,clap_text \
        --out /tmp/logs/kernels-fp16 > /tmp/logs/kernels-fp16.log 2>&1; \
      python3 profile_kernels.py --artifacts /tmp/art-nomerge --top 40 --components unet \
        --out /tmp/logs/kernels-nomerge > /tmp/logs/kernels-nomerge.log 2>&1" ;;
  all-profile-merge)  # setup, the fp16 export, profile-merge
    setup_export_then 16 profile-merge ;;
  all-profile)  # setup, the fp16 export, profile
    setup_export_then "16" profile ;;
  collect)
    # A machine that answers without /tmp/logs/started is a fresh one (the lent machine was replaced between two
    # calls, as in runs AY and BA): nothing runs here, so say so at once instead of polling an empty folder.
    if [ ! -f /tmp/logs/started ]; then
      echo "nothing started on this machine: /tmp/logs/started is missing (a fresh machine?)"; exit 3
    fi
    end=$((SECONDS + $2))
    while [ $SECONDS -lt $end ] && [ ! -f /tmp/logs/done ]; do
      tar -C /tmp -czf "$OUT/logs.tgz" logs; sleep 10
    done
    tar -C /tmp -czf "$OUT/logs.tgz" logs; ls /tmp/logs; tail -n 3 /tmp/logs/*.log ;;
esac
