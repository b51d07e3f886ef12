#!/bin/sh
# Join the frames into a contact sheet (sheet.png) and a looping GIF (render.gif) with
# ImageMagick: on a peer (join.toml), or here when ImageMagick is installed.
set -eu
ls frames/frame*.png >/dev/null
montage frames/frame*.png -tile 6x -geometry 160x120+2+2 -background '#202020' -depth 8 sheet.png
convert -delay 8 -loop 0 frames/frame*.png render.gif
echo "joined $(ls frames/frame*.png | wc -l) frames into sheet.png and render.gif"
