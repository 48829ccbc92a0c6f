#!/usr/bin/env python3
"""Table (stdout, Markdown) and plot (SVG, no dependencies) of `bench fedavg --json` lines:
peak resident memory of the controller and of the clients, and round 0 against the bare
transport, by model size, one series per client count.

    python3 scripts/plot-sweep.py SWEEP.jsonl OUT.svg
"""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
MiB = 1 << 20

# `bare_round_secs` is the bare round over the transport round 0 uses; since the bulk channel
# the JSON also has both bare rounds (sealed TCP, libp2p), shown when present.
print("| model | clients | controller peak | client peak | round 0 | round 1 | bare round (sealed TCP / libp2p) | round 0 / bare | verified |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    rs = r["round_secs"]
    bare = f"{r['bare_round_secs']:.1f} s"
    if r.get("bare_bulk_round_secs") is not None and r.get("bare_libp2p_round_secs") is not None:
        bare = f"{r['bare_bulk_round_secs']:.1f} / {r['bare_libp2p_round_secs']:.1f} s"
    print(
        f"| {r['model_bytes'] / MiB:.0f} MiB | {r['clients']} | {r['controller_peak_rss_bytes'] / MiB:.0f} MiB "
        f"| {r['client_peak_rss_bytes'] / MiB:.0f} MiB | {rs[0]:.1f} s | {rs[1] if len(rs) > 1 else float('nan'):.1f} s "
        f"| {bare} | {r['round0_over_bare']:.2f} | {r['verified']} |"
    )

W, H, L, B, T, R = 720, 420, 70, 50, 40, 170
sizes = sorted({r["model_bytes"] for r in rows})
ymax = max(max(r["controller_peak_rss_bytes"], r["client_peak_rss_bytes"]) for r in rows) / MiB
ymax = max(128, 32 * (int(ymax / 32) + 1))


def x(size):
    i = sizes.index(size)
    return L + (W - L - R) * (i / max(1, len(sizes) - 1))


def y(mib):
    return H - B - (H - B - T) * mib / ymax


colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{L}" y="22" font-size="14">Peak resident memory per process against model size (bench fedavg, 2 rounds)</text>',
       f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
       f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>']
for s in sizes:
    svg.append(f'<text x="{x(s):.0f}" y="{H - B + 18}" text-anchor="middle">{s / MiB:.0f} MiB</text>')
for v in range(0, ymax + 1, max(16, ymax // 8 // 16 * 16)):
    svg.append(f'<text x="{L - 6}" y="{y(v) + 4:.0f}" text-anchor="end">{v}</text>')
    svg.append(f'<line x1="{L}" y1="{y(v):.0f}" x2="{W - R}" y2="{y(v):.0f}" stroke="#eee"/>')
svg.append(f'<text x="16" y="{(H - B + T) / 2:.0f}" transform="rotate(-90 16 {(H - B + T) / 2:.0f})" text-anchor="middle">peak RSS (MiB)</text>')
series = []
for n in sorted({r["clients"] for r in rows}):
    for role, key, dash in (("controller", "controller_peak_rss_bytes", ""), ("client", "client_peak_rss_bytes", "5,4")):
        pts = sorted((r["model_bytes"], r[key] / MiB) for r in rows if r["clients"] == n)
        series.append((f"{role}, {n} clients", pts, dash))
for i, (name, pts, dash) in enumerate(series):
    c = colors[(i // 2) % len(colors)]
    d = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in pts)
    svg.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="2" stroke-dasharray="{dash}"/>')
    for s, v in pts:
        svg.append(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3" fill="{c}"/>')
    ly = T + 10 + 18 * i
    svg.append(f'<line x1="{W - R + 12}" y1="{ly}" x2="{W - R + 36}" y2="{ly}" stroke="{c}" stroke-width="2" stroke-dasharray="{dash}"/>')
    svg.append(f'<text x="{W - R + 42}" y="{ly + 4}">{name}</text>')
svg.append("</svg>")
open(sys.argv[2], "w").write("\n".join(svg) + "\n")
