"""``report.html``: one self-contained page per run, for people who do not read JSON.

    write_html(run_dir, data, summary_md, identity, ledger)   # -> run_dir / "report.html"

What it shows, all from what the run already wrote (``metrics.json`` data, ``summary.md``, the
PNG plots, the ledger's state):

- the run's identity: id, status and message, task, strategy, rounds, hospitals, DP settings,
  config hash, and each hospital's training-set size and epsilon spent;
- the summary tables (federated, personalized and baseline models per test split with their
  bootstrap intervals, what joining bought each hospital, per-class Dice, shared data cards);
- every plot, inlined as base64 PNG with a sentence on how to read it;
- each hospital's explanation gallery (computed at the hospital on its own test split, sent
  only where its site policy says ``share-gallery: true``; otherwise the page says the hospital
  kept it local);
- the events: refusals (a hospital declined: budget, policy, data), updates left out by the
  server and why, missing replies, per round;
- the ledger: entries and head hash at the time of writing, and the command that verifies it.

No script, no external file or font: the page opens offline, from an e-mail attachment or a
hospital's intranet, and can be archived as it is. Written by hand (a few string templates):
the only dependency a template engine would save is one small escape function.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from carefl.checkpoint import atomic_write_text

#: how to read each plot (file stem -> sentence), in the order the page shows them (dice_<c>: after dice)
PLOT_NOTES = {
    'dice': "Dice of the global model on each hospital's own test split after every round (dashed: "
            'baselines).',
    'auc': "AUC of the global model on each hospital's own test split after every round (dashed: "
           'baselines).',
    'accuracy': "Accuracy of the global model on each hospital's test split after every round.",
    'gain_from_joining': 'What joining bought each hospital: its deployed model minus its own '
                         'local-only model, on its own test split (green: better than training '
                         'alone).',
    'epsilon': 'Privacy spent so far by each hospital (epsilon at its own delta); it only grows, '
               'and a hospital stops training when its own cap would be exceeded.',
    'hd95': '95th-percentile Hausdorff distance (voxels; lower is better) of the global model per '
            'hospital.',
    'surface_dice': 'Surface Dice (boundary within 1 voxel; higher is better) of the global model '
                    'per hospital.',
    'sensitivity': 'Sensitivity of the global model per hospital.',
    'specificity': 'Specificity of the global model per hospital.',
    'norm': "L2 norm of each hospital's update. Updates far above the others' are what the server's"
            ' norm bound and robust rule guard against.',
    'cosine': "Cosine between each hospital's update and the aggregate: near 1 agrees with the "
              'consortium, near or below 0 pulls elsewhere (a different population, or an attack).',
    'reputation': "Reputation: the server's running record of how often a hospital's update was "
                  'selected by the robust rule (1: always used, 0: always left out). It is a '
                  'diagnostic, not a vote.',
    'train_loss': 'Local training loss (sent only without DP: under DP it is an unnoised '
                  'statistic).',
}

_STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:70em;
color:#1a1a1a;line-height:1.45;padding:0 1em}h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;
padding-bottom:.2em;margin-top:2em}table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #bbb;
padding:.25em .6em;text-align:left}th{background:#f0f0f0}.ok{color:#176d17}.bad{color:#a11}.note{color:#555;
font-size:.92em}figure{display:inline-block;margin:.6em 1.2em .6em 0;vertical-align:top;max-width:32em}
figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.88em;color:#444}code{background:#f4f4f4;
padding:0 .25em}"""


def _esc(value) -> str:
    return html.escape(str(value))


def markdown_to_html(text: str) -> str:
    """The small markdown :meth:`carefl.report.Report.summary` writes: paragraphs, ``|`` tables
    (first row a header, second the separator) and ``- `` bullet lists."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]
            out.append("<table><tr>" + "".join(f"<th>{_esc(c)}</th>" for c in rows[0]) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].strip().startswith("- "):
                item = lines[i].strip()[2:]
                cls = ' class="bad"' if item.startswith("WARNING") else ""
                items.append(f"<li{cls}>{_esc(item)}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        if line:
            out.append(f"<p>{_esc(line)}</p>")
        i += 1
    return "\n".join(out)


def _events(data: dict) -> str:
    rows = []
    for record in data["rounds"]:
        for hospital, m in record["train"].items():
            if m.get("status") != "ok":
                reason = m.get("reason") or ""
                rows.append(f"<tr><td>{record['round']}</td><td>{_esc(hospital)}</td><td>{_esc(m.get('status'))}</td>"
                            f"<td>{_esc(reason)}</td></tr>")
    if not rows:
        return '<p class="ok">No refusal, left-out update or missing reply: every hospital took part in every round.</p>'
    return ("<p>refused: the hospital declined (its budget, policy or data); rejected: the server left its update "
            "out; no-reply: nothing arrived in time.</p><table><tr><th>round</th><th>hospital</th><th>event</th>"
            "<th>why</th></tr>" + "".join(rows) + "</table>")


def _identity(data: dict, identity: dict) -> str:
    last: dict[str, dict] = {}
    for record in data["rounds"]:  # each hospital's latest figures (a refusal keeps the earlier ones)
        for h, m in record["train"].items():
            known = {k: v for k, v in m.items() if k in ("num_examples", "epsilon", "delta") and v}
            last.setdefault(h, {}).update(known)
    rows = [("run", data["run_id"]), ("status", f"{data['status']}" + (f": {data['message']}" if data["message"] else "")),
            *identity.items()]
    table = "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows) + "</table>"
    sites = ["<table><tr><th>hospital</th><th>training records</th><th>epsilon spent</th><th>delta</th></tr>"]
    for h in data["hospitals"]:
        m = last.get(h, {})
        eps = m.get("epsilon")
        sites.append(f"<tr><td>{_esc(h)}</td><td>{_esc(int(m['num_examples'])) if m.get('num_examples') else '-'}</td>"
                     f"<td>{f'{eps:.3f}' if isinstance(eps, (int, float)) else '-'}</td>"
                     f"<td>{_esc(m.get('delta', '-'))}</td></tr>")
    return table + "".join(sites) + "</table>"


def _plots(plots_dir: Path) -> str:
    figures = []
    order = list(PLOT_NOTES)  # the headline metrics first, then privacy, gain and the robust signals
    for png in sorted(plots_dir.glob("*.png"), key=lambda p: (order.index(p.stem) if p.stem in order else 0.5, p.stem)):
        note = PLOT_NOTES.get(png.stem) or (f"Dice of foreground class {png.stem[5:]} per hospital."
                                            if png.stem.startswith("dice_") else png.stem)
        data = base64.b64encode(png.read_bytes()).decode()
        figures.append(f'<figure><img alt="{_esc(png.stem)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{_esc(note)}</figcaption></figure>")
    return "".join(figures) or "<p>No plots were written.</p>"


#: how to read a gallery, by task kind
GALLERY_NOTES = {
    "segmentation": "Each row: a test image, the final model's foreground probability over it (mean over the "
                    "image and its flips along every axis) and the variance of that probability across the "
                    "flips (bright where the answer depends on the flip: uncertain, typically at borders).",
    "classification": "Each row: a test image, occlusion sensitivity (how much the predicted class's score drops "
                      "when a patch is blurred out) and GradCAM of the last convolution (evidence for that class).",
}


def _gallery(run_dir: Path, data: dict, kind: str) -> str:
    """Each hospital's explanation gallery as the server received it (``data["gallery"]``, PNGs
    checked by :func:`carefl.replies.check_gallery`), or a line saying it stayed at the hospital."""
    final = data["rounds"][-1]["eval"] if data["rounds"] else {}
    shared = data.get("gallery") or {}
    parts = [f'<p class="note">Computed by each hospital with <code>carefl.explain</code> on its own test split, '
             f"for the final federated model. {_esc(GALLERY_NOTES.get(kind, ''))} A hospital sends its gallery only "
             "if its site policy says <code>share-gallery: true</code>; images are patient data.</p>"]
    for h in data["hospitals"]:
        files = [run_dir / f for f in shared.get(h, []) if (run_dir / f).is_file()]
        if files:
            parts.append(f"<h3>{_esc(h)}</h3>" + "".join(
                f'<figure><img alt="gallery {_esc(h)} {i}" src="data:image/png;base64,'
                f'{base64.b64encode(f.read_bytes()).decode()}"><figcaption>{_esc(h)}, test image {i}</figcaption></figure>'
                for i, f in enumerate(files, 1)))
        elif h in final:
            parts.append(f'<p class="note">{_esc(h)} kept its gallery local: its site policy does not share images '
                         "(<code>share-gallery</code>), so it is only in its own state dir (<code>gallery/</code>).</p>")
        else:
            parts.append(f'<p class="note">{_esc(h)}: no gallery (it did not evaluate the final model).</p>')
    return "".join(parts)


def write_html(run_dir: Path, data: dict, summary_md: str, identity: dict, ledger: dict) -> Path:
    """Write ``run_dir/report.html`` (atomically) and return its path.

    Args:
        data: the ``metrics.json`` content (:class:`carefl.report.Report` ``data``).
        summary_md: the run's ``summary.md`` text.
        identity: label -> value rows for the run's identity table (strategy, rounds, DP, ...).
        ledger: ``{"entries": int, "head": str}`` at the time of writing.
    """
    run_dir = Path(run_dir)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>CareFL run {_esc(data['run_id'])}</title><style>{_STYLE}</style></head><body>
<h1>CareFL run {_esc(data['run_id'])}: {_esc(data['task'])}, <span class="{'ok' if data['status'] == 'completed' else 'bad'}">{_esc(data['status'])}</span></h1>
<h2>Run</h2>{_identity(data, identity)}
<h2>Results</h2>{markdown_to_html(summary_md)}
<p class="note">Values are computed by each hospital on its own test split; the interval in brackets is a 95%
bootstrap interval over that split's test images (how much the figure depends on which patients happened to be
in the test split), not over training runs.</p>
<h2>Plots</h2>{_plots(run_dir / 'plots')}
<h2>Explanations</h2>{_gallery(run_dir, data, 'segmentation' if data['headline'] == 'dice' else 'classification')}
<h2>Events</h2>{_events(data)}
<h2>Audit</h2><p>Ledger: {_esc(ledger['entries'])} entries written, head <code>{_esc(ledger['head'])}</code>; the final
entry, written after this page, records the hashes of <code>model_final.pt</code>, <code>config.yaml</code>,
<code>metrics.json</code>, <code>summary.md</code> and this file. Check them all with
<code>carefl-verify {_esc(run_dir)}</code>, and against each hospital's own receipts with
<code>--receipts &lt;its receipts.jsonl&gt;</code>.</p>
</body></html>
"""
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path
