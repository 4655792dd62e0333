#!/usr/bin/env bash
# Regenerates the pre-encoded clips that `webcall peer --send testsrc` loops (crates/peer/clips), with Debian's
# ffmpeg (apt-get install ffmpeg): three VP8 layers of one test pattern for simulcast, and an Opus tone.
# Real-time settings so a receiver can join anywhere: a keyframe every second, no alt-ref or look-ahead frames
# (every packet is one shown frame), constant bitrate, error resilient.
set -euo pipefail
cd "$(dirname "$0")/../crates/peer/clips"

SECONDS_LONG=4
FPS=30

vp8() { # NAME SIZE KBPS
  ffmpeg -nostdin -hide_banner -loglevel error -y \
    -f lavfi -i "testsrc2=size=$2:rate=$FPS:duration=$SECONDS_LONG" \
    -c:v libvpx -b:v "$3k" -minrate "$3k" -maxrate "$3k" -bufsize "$3k" \
    -g "$FPS" -keyint_min "$FPS" -auto-alt-ref 0 -lag-in-frames 0 -error-resilient 1 \
    -deadline good -cpu-used 2 -threads 1 -pix_fmt yuv420p \
    -f ivf "$1.ivf"
}

vp8 low 320x180 150
vp8 mid 640x360 500
vp8 high 1280x720 1500

# A 440 Hz tone that beeps once a second, mono, 20 ms packets, in Ogg.
ffmpeg -nostdin -hide_banner -loglevel error -y \
  -f lavfi -i "sine=frequency=440:beep_factor=2:sample_rate=48000:duration=$SECONDS_LONG" \
  -c:a libopus -b:a 32k -frame_duration 20 -application audio -ac 1 \
  -map_metadata -1 -fflags +bitexact -flags:a +bitexact \
  audio.opus

ls -l low.ivf mid.ivf high.ivf audio.opus
