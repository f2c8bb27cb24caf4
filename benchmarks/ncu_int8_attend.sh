#!/bin/bash
# ncu (the sections that ran here before: `--set full` crashed the process) of the K4/V3 int8 attention's Mosaic kernel and prologue at 8 x 32K and
# 8 x 4K (`int8_decode_check --profile`), on the H200 (Firecracker: counters readable):
#   bash benchmarks/ncu_int8_attend.sh OUT_DIR
# writes OUT_DIR/int8_attend.ncu-rep, the details page and the SASS source page with
# per-instruction stall samples of the first 8 x 32K Mosaic launch.
set -u
out=${1:?out dir}
ncu --clock-control none -k regex:"mosaic_gpu|decode_prologue" \
  --section LaunchStats --section Occupancy --section WarpStateStats --section InstructionStats --section SchedulerStats --section SourceCounters --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  -o "$out/int8_attend" -f python -m benchmarks.int8_decode_check --profile \
  > "$out/ncu_run.log" 2>&1
echo "ncu rc $?"
ncu --import "$out/int8_attend.ncu-rep" --page details > "$out/ncu_details.txt" 2>&1
ncu --import "$out/int8_attend.ncu-rep" --page source --csv --print-source sass \
  -k regex:mosaic_gpu --launch-count 1 > "$out/ncu_source_32k.csv" 2>&1
ncu --import "$out/int8_attend.ncu-rep" --page source --csv --print-source sass \
  -k regex:mosaic_gpu --launch-skip 2 --launch-count 1 > "$out/ncu_source_4k.csv" 2>&1
ls -la "$out"
