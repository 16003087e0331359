"""Which inputs mpistyle opens at all: an allow-list of single-file container formats.

FFmpeg also reads *indirect* formats that open other files or URLs named inside the input (HLS
and DASH playlists, concat lists, image-sequence patterns, SDP, tee, ...). An upload of 95 bytes
could then make a job read any file the job can read, or a live stream that never ends. So an
input is opened only with one of the demuxers below (FFmpeg's ``format_whitelist``) and only
through the ``file`` protocol; the watcher takes only names with one of :data:`VIDEO_SUFFIXES`.
Each demuxer here reads the one file it is given and nothing else.
"""
from __future__ import annotations

# FFmpeg demuxer names (as ``ffmpeg -demuxers`` prints them), one entry per family.
DEMUXERS: dict[str, str] = {
    "mov,mp4,m4a,3gp,3g2,mj2": "MP4 / MOV",
    "matroska,webm": "Matroska / WebM",
    "avi": "AVI",
    "mpegts": "MPEG-TS",
    "flv": "FLV",
}
# The muxer names (video.format) of those families: the containers mpistyle writes, since it
# reads its own output back (the preview, which a user and the watcher take as the proof).
READABLE_OUTPUTS = frozenset(name for family in DEMUXERS for name in family.split(","))
# FFmpeg's format_whitelist option: a comma-separated list of demuxer names.
FORMAT_WHITELIST = ",".join(DEMUXERS)
# Protocols an input may be read through: the local (or NFS-mounted) file itself.
PROTOCOL_WHITELIST = "file"

# Demuxers of single pictures (a style image): each reads the one file it is given. image2
# would expand a name like img%03d.png into a sequence: opened with pattern_type=none, it reads
# the file of that very name.
PICTURE_DEMUXERS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe", "gif_pipe", "ppm_pipe")
# A picture, or a video's first frame.
PICTURE_WHITELIST = ",".join((*PICTURE_DEMUXERS, *DEMUXERS))

# The names the watcher accepts as videos (lower case), and the formats they stand for.
VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".m2ts", ".mts", ".flv")


def describe() -> str:
    """The allowed formats, for messages and docs."""
    return ", ".join(DEMUXERS.values())
