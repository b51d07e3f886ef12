#!/bin/sh
# Render this rank's share of the animation into frames/ (p2prc runs it in each container).
# Rank r of n takes frames r+1, r+1+n, r+1+2n, ... so every rank gets a fair mix of frames.
# FRAMES, WIDTH, HEIGHT and THREADS come from the task's env; THREADS defaults to the CPUs
# the container may use (its cgroup's cpu.max, as the task's resources.cpus set it).
set -eu
frames=${FRAMES:-24}
rank=${P2PRC_NODE_RANK:-0}
ranks=${P2PRC_NUM_NODES:-1}
threads=$(nproc)
if [ -r /sys/fs/cgroup/cpu.max ]; then
    read -r quota period </sys/fs/cgroup/cpu.max
    if [ "$quota" != max ]; then
        threads=$(((quota + period - 1) / period))
    fi
fi
threads=${THREADS:-$threads}
mkdir -p frames
# Debian's povray.conf lets POV-Ray write only in the directory it runs in (not below it),
# so it runs inside frames/ and reads the scene from its parent (under $HOME: readable).
cd frames
frame=$((rank + 1))
count=0
start=$(date +%s)
while [ "$frame" -le "$frames" ]; do
    began=$(date +%s)
    # POV-Ray's banner and progress go to a log, shown only when a frame fails.
    if ! povray -D +I../scene.pov +Oframe.png +FN +W"${WIDTH:-320}" +H"${HEIGHT:-240}" +A0.3 \
        +KFI1 +KFF"$frames" +KC +SF"$frame" +EF"$frame" +WT"$threads" 2>../povray.log; then
        tail -n 20 ../povray.log >&2
        exit 1
    fi
    echo "frame $frame of $frames: $(($(date +%s) - began)) s"
    count=$((count + 1))
    frame=$((frame + ranks))
done
echo "rank $rank of $ranks: $count frames of $frames in $(($(date +%s) - start)) s ($threads threads)"
