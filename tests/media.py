"""Read videos back for assertions (decoded frames with their times, raw audio packets), and
make the hostile and awkward inputs the tests feed in."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from mpistyle.sample import landscape, make_video


def decode_all(path: Path) -> tuple[list[np.ndarray], list[float]]:
    """Every frame (RGB) and its presentation time in seconds, from a straight decode."""
    frames, times = [], []
    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.video[0]):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(float(frame.pts * frame.time_base))
    return frames, times


def audio_packets(path: Path) -> list[list[bytes]]:
    """The raw packets of each audio stream, to compare copies byte for byte."""
    with av.open(str(path)) as container:
        streams = list(container.streams.audio)
        tracks: list[list[bytes]] = [[] for _ in streams]
        position = {stream.index: i for i, stream in enumerate(streams)}
        for packet in container.demux(streams):
            if packet.size:
                tracks[position[packet.stream_index]].append(bytes(packet))
    return tracks


def stream_summary(path: Path) -> list[tuple[str, str]]:
    with av.open(str(path)) as container:
        return [(s.type, s.codec_context.name if s.codec_context else "") for s in container.streams]


def keyframe_flags(path: Path) -> list[bool]:
    """Whether each video packet is a keyframe, in presentation order."""
    with av.open(str(path)) as container:
        packets = [(p.pts, p.is_keyframe) for p in container.demux(container.streams.video[0]) if p.size]
    return [key for _, key in sorted(packets)]


# Hostile and awkward inputs, made small and from nothing (tests/test_hostile_inputs.py and the
# corpus in tests/test_bad_inputs.py).


def hls_playlist(folder: Path) -> Path:
    """A 100-byte HLS playlist whose one segment is a real video outside the playlist's folder:
    what an upload would use to make a job read another user's file."""
    (folder / "secret").mkdir(exist_ok=True)
    make_video(folder / "secret" / "victim.ts", frames=4, audio=0)
    (folder / "upload").mkdir(exist_ok=True)
    playlist = folder / "upload" / "innocent.m3u8"
    playlist.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n../secret/victim.ts\n#EXT-X-ENDLIST\n")
    return playlist


def concat_list(folder: Path) -> Path:
    """An ffconcat list naming a video beside it (FFmpeg's concat demuxer opens it)."""
    make_video(folder / "victim.mp4", frames=4, audio=0)
    listing = folder / "list.ffconcat"
    listing.write_text("ffconcat version 1.0\nfile victim.mp4\n")
    return listing


def sdp_session(folder: Path) -> Path:
    """An SDP description: FFmpeg would listen for an RTP stream, forever."""
    path = folder / "stream.sdp"
    path.write_text(
        "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=video 5004 RTP/AVP 96\na=rtpmap:96 H264/90000\n"
    )
    return path


def image_sequence(folder: Path) -> Path:
    """A file literally named ``img%03d.png`` beside img000.png...: FFmpeg's image2 demuxer reads
    the name as a pattern and opens the others."""
    picture = png_picture()
    for index in range(3):
        (folder / f"img{index:03d}.png").write_bytes(picture)
    (folder / "img%03d.png").write_bytes(picture)
    return folder / "img%03d.png"


def joined(sources: list[Path], target: Path) -> Path:
    """The video packets of ``sources`` back to back in one stream whose header is the first's:
    e.g. a 64x48 H.264 stream that carries 96x96 frames after its first GOP (a new SPS). MPEG-TS
    in and out, where H.264 carries its SPS in the packets."""
    with av.open(str(sources[0])) as first, av.open(str(target), "w") as out:
        stream = out.add_stream_from_template(first.streams.video[0])
        offset = 0
        for source in sources:
            with av.open(str(source)) as src:
                packets = [p for p in src.demux(src.streams.video[0]) if p.size]
                step = packets[1].pts - packets[0].pts if len(packets) > 1 else 1
                for packet in packets:
                    moved = av.Packet(bytes(packet))
                    moved.pts, moved.dts = packet.pts + offset, packet.dts + offset
                    moved.time_base, moved.is_keyframe, moved.stream = packet.time_base, packet.is_keyframe, stream
                    out.mux(moved)
                offset += max(p.pts for p in packets) - min(p.pts for p in packets) + abs(step)
    return target


def repeated_frames(path: Path, frames: int, fps: int = 25) -> Path:
    """A frame-count bomb: one 64x48 H.264 keyframe, then ``frames - 1`` copies of a 10-byte
    frame that repeats it (an 8K one is barely bigger: millions of frames fit in a small file)."""
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt, codec.time_base = 64, 48, "yuv420p", Fraction(1, fps)
    codec.options = {"bf": "0", "g": "1000000", "preset": "ultrafast"}
    still = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 90, np.uint8), format="rgb24").reformat(format="yuv420p")
    encoded = []
    for pts in range(2):
        still.pts = pts
        encoded += codec.encode(still)
    encoded += codec.encode(None)
    key, repeat = bytes(encoded[0]), bytes(encoded[1])
    with av.open(str(path), "w") as out:
        stream = out.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.extradata = codec.extradata
        for index in range(frames):
            packet = av.Packet(key if index == 0 else repeat)
            packet.pts = packet.dts = index
            packet.time_base, packet.is_keyframe, packet.stream = Fraction(1, fps), index == 0, stream
            out.mux(packet)
    return path


def mjpeg_pcm_avi(path: Path, frames: int = 6, channels: int = 2) -> Path:
    """What cameras and old capture tools write: MJPEG video and 16-bit PCM sound in an AVI (MP4
    cannot hold that PCM as it is)."""
    layout = {1: "mono", 2: "stereo"}.get(channels, f"{channels} channels")
    with av.open(str(path), "w") as out:
        video = out.add_stream("mjpeg", rate=12)
        video.width, video.height, video.pix_fmt = 64, 48, "yuvj420p"
        audio = out.add_stream("pcm_s16le", rate=48000)
        audio.layout = layout
        for index in range(frames):
            picture = av.VideoFrame.from_ndarray(landscape(index, 64, 48), format="rgb24").reformat(format="yuvj420p")
            out.mux(video.encode(picture))
        out.mux(video.encode(None))
        samples = 48000 * frames // 12
        tone = (3000 * np.sin(2 * np.pi * 440 * np.arange(samples) / 48000)).astype(np.int16)
        for start in range(0, samples, 1024):
            chunk = np.repeat(tone[start : start + 1024], channels)[None, :]  # s16 is interleaved
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="s16", layout=layout)
            frame.sample_rate, frame.pts = 48000, start
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    return path


def open_gop_ts(path: Path, frames: int = 60, gop: int = 15) -> Path:
    """What broadcast files and FFmpeg's mpeg2video encoder write by default: MPEG-2 video with
    B-frames in open GOPs (a GOP's first B-frames are shown before its keyframe and need the GOP
    before) at 29.97 fps, with AC-3 sound, in MPEG-TS."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg2video", rate=Fraction(30000, 1001))
        video.width, video.height, video.pix_fmt = 160, 96, "yuv420p"
        video.codec_context.options = {"bf": "2", "g": str(gop)}
        audio = out.add_stream("ac3", rate=48000)
        audio.layout = "stereo"
        for index in range(frames):
            out.mux(video.encode(av.VideoFrame.from_ndarray(landscape(index, 160, 96), format="rgb24")))
        out.mux(video.encode(None))
        samples = int(48000 * frames * 1001 / 30000)
        tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(samples) / 48000)).astype(np.float32)
        for start in range(0, samples - 1536 + 1, 1536):
            frame = av.AudioFrame.from_ndarray(np.stack([tone[start : start + 1536]] * 2), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = 48000, start
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    return path


def with_extra_streams(source: Path, target: Path) -> Path:
    """``source`` remuxed with the streams mpistyle drops beside its own: a timecode track (mov),
    a KLV data stream (MPEG-TS), or attachments and a cover picture (Matroska)."""
    suffix = target.suffix
    with av.open(str(source)) as src, av.open(str(target), "w") as out:
        streams = {s.index: out.add_stream_from_template(s) for s in src.streams}
        data = None
        if suffix == ".mov":
            streams[0].metadata["timecode"] = "01:00:00:00"  # the mov muxer writes a tmcd track
        elif suffix == ".ts":
            data = out.add_data_stream("klv")
        elif suffix == ".mkv":
            out.add_attachment("notes.txt", "text/plain", b"not a video")
            out.add_attachment("cover.png", "image/png", png_picture())
        for packet in src.demux():
            if packet.size:
                packet.stream = streams[packet.stream_index]
                out.mux(packet)
        if data is not None:
            for index in range(3):
                klv = av.Packet(b"\x06\x0e\x2b\x34" + bytes(20))
                klv.pts = klv.dts = index * 30000
                klv.time_base, klv.stream = Fraction(1, 90000), data
                out.mux(klv)
    return target


def png_picture() -> bytes:
    """A 16x16 black PNG."""
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = 16, 16, "rgb24"
    frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
    return b"".join(bytes(p) for p in codec.encode(frame) + codec.encode(None))


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 pictures (or stacks), in dB."""
    error = np.mean((reference.astype(np.float64) - other.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255.0**2 / error))
