"""The video-analytics sidecar's JSON lines, as its tests read them (test_video_analytics.py on
the host, test_docker_stack.py in the compose stack)."""


def iou(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


def faces(events):
    """{(source, box): [identity per sighting]}: a face seen again in the same source is the
    one whose box overlaps it (IoU >= 0.9; the server's boxes may move by a pixel between
    detector batches of different sizes)."""
    seen = {}
    for e in events:
        if "identity" not in e:
            continue
        key = next((k for k in seen if k[0] == e["source"] and iou(k[1], e["box"]) >= 0.9),
                   (e["source"], tuple(e["box"])))
        seen.setdefault(key, []).append(e["identity"])
    return seen
