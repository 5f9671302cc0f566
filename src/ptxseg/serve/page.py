"""The two pages ``ptxseg serve`` shows a person, both self-contained: no file, font or script
is loaded from anywhere (a hospital network reaches no CDN), and the Content-Security-Policy
of each says so to the browser (:func:`csp`: the page's own inline script and style by hash,
images from ``data:`` URLs, requests to the service itself only).

- ``GET /`` (:func:`viewer_page`): drop or choose a radiograph (PNG, JPEG, DICOM); the page
  posts it to ``/v1/predict`` and draws the reduced radiograph with the predicted region
  tinted; a threshold slider redraws that region in the page from the returned reduced
  probability map (no new request); links download the service's mask and overlay and the
  view as drawn.
- ``GET /docs`` (:func:`docs_page`): the API reference, rendered on the server from the
  OpenAPI schema (FastAPI's own Swagger UI loads its script from a CDN); the schema itself is
  at ``/openapi.json``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from typing import Any

STYLE = """
:root { color-scheme: light dark; --fg: #111; --bg: #fafafa; --muted: #666; --accent: #d55e00;
        --panel: #fff; --line: #ccc; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #eee; --bg: #1b1b1b; --muted: #aaa; --panel: #262626; --line: #444; } }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
header, main { max-width: 1200px; margin: 0 auto; padding: 12px 20px; }
header h1 { font-size: 20px; margin: 4px 0; }
header p { margin: 2px 0; color: var(--muted); }
main { display: grid; grid-template-columns: minmax(0, 3fr) minmax(280px, 2fr); gap: 20px; }
@media (max-width: 800px) { main { grid-template-columns: 1fr; } }
#drop { display: block; border: 2px dashed var(--line); border-radius: 8px; padding: 18px;
        text-align: center; cursor: pointer; background: var(--panel); }
#drop.over { border-color: var(--accent); }
#drop input { display: block; margin: 8px auto 0; }
#status { min-height: 1.5em; margin: 8px 0; }
body[data-state="error"] #status { color: #c00; font-weight: 600; }
#view { display: block; width: 100%; height: auto; background: #000; border-radius: 4px; }
.panel { background: var(--panel); border: 1px solid var(--line); border-radius: 8px;
         padding: 12px 16px; margin-bottom: 14px; }
.finding { font-size: 18px; font-weight: 700; margin: 0 0 6px; }
.finding.pos { color: var(--accent); }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 3px 12px; margin: 0; }
dt { color: var(--muted); } dd { margin: 0; overflow-wrap: anywhere; }
label.slider { display: block; margin: 10px 0 4px; font-weight: 600; }
input[type=range] { width: 100%; }
.note { color: var(--muted); font-size: 13px; margin: 4px 0; }
.downloads a { display: inline-block; margin: 4px 8px 4px 0; padding: 6px 10px;
               border: 1px solid var(--line); border-radius: 6px; color: inherit;
               text-decoration: none; }
.downloads a[aria-disabled="true"] { opacity: .4; pointer-events: none; }
#overlay { width: 100%; height: auto; border-radius: 4px; }
[hidden] { display: none !important; }
"""

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const TINT = [213, 94, 0];  // Okabe-Ito vermillion, the overlays' prediction colour
let result = null, preview = null, map = null, stem = "image";

function setState(state, text) {
  document.body.dataset.state = state;
  $("status").textContent = text;
}

function loadImage(b64) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("cannot decode an image of the answer"));
    img.src = "data:image/png;base64," + b64;
  });
}

function mapValues(img) {
  const c = document.createElement("canvas");
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const rgba = ctx.getImageData(0, 0, c.width, c.height).data;
  const v = new Uint8Array(c.width * c.height);
  for (let i = 0; i < v.length; i++) v[i] = rgba[4 * i];
  return {width: c.width, height: c.height, values: v};
}

function ruleThreshold(rule) {
  return rule.mode === "triplet" ? rule.bottom_threshold : rule.binary_threshold;
}

function draw() {
  if (!result) return;
  const t = parseFloat($("threshold").value);
  $("tvalue").textContent = t.toFixed(2);
  const view = $("view"), ctx = view.getContext("2d");
  view.width = preview.naturalWidth; view.height = preview.naturalHeight;
  ctx.drawImage(preview, 0, 0);
  const {width: w, height: h, values} = map;
  const cut = Math.floor(t * 255 + 1e-6);  // value / 255 > t  <=>  value > floor(255 t)
  const layer = new ImageData(w, h);
  let above = 0;
  const inside = (x, y) => x >= 0 && y >= 0 && x < w && y < h && values[y * w + x] > cut;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      if (!inside(x, y)) continue;
      above++;
      const edge = !inside(x - 1, y) || !inside(x + 1, y) || !inside(x, y - 1) || !inside(x, y + 1);
      const o = 4 * (y * w + x);
      layer.data[o] = TINT[0]; layer.data[o + 1] = TINT[1]; layer.data[o + 2] = TINT[2];
      layer.data[o + 3] = edge ? 255 : 90;
    }
  }
  const off = document.createElement("canvas");
  off.width = w; off.height = h;
  off.getContext("2d").putImageData(layer, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(off, 0, 0, view.width, view.height);
  const share = 100 * above / (w * h);
  $("above").textContent = above
    ? `${share.toFixed(1)} % of the image above ${t.toFixed(2)}`
    : `no pixel above ${t.toFixed(2)}`;
  view.dataset.threshold = t.toFixed(2);
  view.dataset.above = String(above);
}

function row(dl, name, value) {
  const dt = document.createElement("dt"), dd = document.createElement("dd");
  dt.textContent = name; dd.textContent = value;
  dl.append(dt, dd);
}

function showFindings(r, fileName) {
  const f = $("finding");
  f.textContent = r.has_pneumothorax ? "PNEUMOTHORAX predicted" : "no pneumothorax predicted";
  f.className = "finding " + (r.has_pneumothorax ? "pos" : "neg");
  const dl = $("facts");
  dl.replaceChildren();
  row(dl, "file", `${fileName} (${r.format}, ${r.width} x ${r.height} px)`);
  row(dl, "max probability", r.max_prob.toFixed(3));
  row(dl, "area", r.area_cm2 === null
      ? `${r.area_px.toLocaleString()} px (cm² unknown: ${r.area_note})`
      : `${r.area_cm2.toFixed(1)} cm² (${r.area_px.toLocaleString()} px; ${r.area_note})`);
  row(dl, "side", r.side + (r.side_basis ? ` (${r.side_basis})` : ""));
  row(dl, "rule", $("rule").dataset.text);
  row(dl, "time", `${r.seconds.toFixed(2)} s in the service`);
}

function link(id, href, name) {
  const a = $(id);
  a.href = href; a.download = name;
  a.removeAttribute("aria-disabled");
}

async function send(file) {
  if (!file) return;
  stem = (file.name || "image").replace(/\.[^.]*$/, "") || "image";
  setState("busy", `analysing ${file.name} (${(file.size / 1e6).toFixed(1)} MB) ...`);
  const form = new FormData();
  form.append("file", file, file.name || "upload");
  let r, body;
  try {
    r = await fetch("v1/predict", {method: "POST", body: form});
    body = await r.json();
  } catch (e) {
    setState("error", `no answer from the service (${e.message})`);
    return;
  }
  if (!r.ok) {
    setState("error", `${r.status}: ${body.detail}`);
    return;
  }
  try {
    [preview, map] = await Promise.all([loadImage(body.preview_png),
                                        loadImage(body.probability_map.png).then(mapValues)]);
  } catch (e) {
    setState("error", e.message);
    return;
  }
  result = body;
  $("threshold").value = ruleThreshold(body.thresholds);
  $("threshold").disabled = false;
  $("overlay").src = "data:image/png;base64," + body.overlay_png;
  link("dl-mask", "data:image/png;base64," + body.mask_png, `${stem}_mask.png`);
  link("dl-overlay", "data:image/png;base64," + body.overlay_png, `${stem}_overlay.png`);
  $("dl-view").removeAttribute("aria-disabled");
  $("results").hidden = false;
  $("view").hidden = false;
  showFindings(body, file.name || "upload");
  draw();
  setState("done", `${file.name}: done`);
}

$("file").addEventListener("change", (e) => send(e.target.files[0]));
const drop = $("drop");
["dragenter", "dragover"].forEach((k) => drop.addEventListener(k, (e) => {
  e.preventDefault(); drop.classList.add("over");
}));
["dragleave", "drop"].forEach((k) => drop.addEventListener(k, () => drop.classList.remove("over")));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
});
$("threshold").addEventListener("input", draw);
$("dl-view").addEventListener("click", () => {
  const t = $("threshold").value;
  link("dl-view", $("view").toDataURL("image/png"), `${stem}_view_t${t}.png`);
});
setState("idle", "no image yet");
"""

VIEWER = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ptxseg: pneumothorax segmentation</title>
<style>{style}</style>
</head>
<body data-state="idle">
<header>
<h1>ptxseg: pneumothorax segmentation</h1>
<p id="model">{model}</p>
<p id="rule" data-text="{rule}">Rule of the service: {rule}</p>
<p>Research use only: not for diagnosis. Images are analysed in memory and not kept.</p>
</header>
<main>
<section>
<label id="drop" for="file">Drop a chest radiograph here (PNG, JPEG or DICOM), or choose one:
<input id="file" type="file"
 accept=".png,.jpg,.jpeg,.dcm,.dicom,image/png,image/jpeg,application/dicom">
</label>
<p id="status" role="status" aria-live="polite"></p>
<canvas id="view" width="512" height="512" hidden
 aria-label="radiograph with the predicted region"></canvas>
</section>
<aside id="results" hidden>
<div class="panel">
<p id="finding" class="finding"></p>
<dl id="facts"></dl>
</div>
<div class="panel">
<label class="slider" for="threshold">Threshold <output id="tvalue"></output></label>
<input id="threshold" type="range" min="0" max="1" step="0.01" value="0.5" disabled>
<p id="above" class="note"></p>
<p class="note">The slider redraws the region from the reduced probability map in this page
(pixels above the threshold). The service's mask, area and finding use the rule above at full
size{removal}.</p>
</div>
<div class="panel downloads">
<a id="dl-mask" aria-disabled="true">mask (PNG, full size)</a>
<a id="dl-overlay" aria-disabled="true">overlay (PNG)</a>
<a id="dl-view" href="#" aria-disabled="true">this view (PNG)</a>
</div>
<div class="panel">
<p class="note">The service's overlay (rule above):</p>
<img id="overlay" alt="overlay of the service's mask">
</div>
</aside>
</main>
<script>{script}</script>
</body>
</html>
"""


def _sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def csp(*, scripts: tuple[str, ...] = (), styles: tuple[str, ...] = ()) -> str:
    """A Content-Security-Policy that lets a page run only the given inline scripts and
    styles, show ``data:`` / ``blob:`` images and talk to its own origin: nothing else loads."""
    script = " ".join(_sha(s) for s in scripts) or "'none'"
    style = " ".join(_sha(s) for s in styles) or "'none'"
    return (
        f"default-src 'none'; script-src {script}; style-src {style}; img-src data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def viewer_page(model: dict[str, Any]) -> tuple[str, str]:
    """The viewer (``GET /``) for a model described by ``model`` (``/v1/model``), and its
    Content-Security-Policy."""
    rule = model["thresholds_rule"]
    removal = ""
    thresholds = model["thresholds"]
    if thresholds.get("removal_area") or thresholds.get("min_area"):
        removal = ", component areas included"
    text = (
        f"run {model['run']}: {model['architecture']}/{model['encoder']}, "
        f"{model['input_size']} px, tta {model['tta']}, ptxseg {model['version']}"
    )
    page = VIEWER.format(
        style=STYLE, script=SCRIPT, model=html.escape(text), rule=html.escape(rule),
        removal=removal,
    )  # fmt: skip
    return page, csp(scripts=(SCRIPT,), styles=(STYLE,))


# ---------------------------------------------------------------------------------------------
# the API reference

DOCS_STYLE = """
body { margin: 0 auto; max-width: 960px; padding: 16px 20px; font: 15px/1.5 system-ui,
       sans-serif; }
h2 { margin-top: 28px; border-bottom: 1px solid #ccc; }
.op { border: 1px solid #ccc; border-radius: 8px; padding: 8px 14px; margin: 14px 0; }
.method { font: 700 13px monospace; padding: 2px 6px; border-radius: 4px; background: #ddd;
          color: #111; }
code, pre { font-family: ui-monospace, monospace; font-size: 13px; }
pre { background: rgba(127, 127, 127, .12); padding: 8px; overflow-x: auto; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
"""


def _schema_text(schema: dict[str, Any], components: dict[str, Any]) -> str:
    """A short type for a parameter's schema: ``string``, ``json | dicom-seg``, ``boolean``."""
    if "$ref" in schema:
        schema = components.get(schema["$ref"].rsplit("/", 1)[-1], {})
    if "enum" in schema:
        return " | ".join(str(v) for v in schema["enum"])
    if "anyOf" in schema:
        return " | ".join(_schema_text(s, components) for s in schema["anyOf"])
    return str(schema.get("type", "object"))


def _markdown_code(text: str) -> str:
    """Escaped ``text`` with ``code`` spans and blank-line paragraphs."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return "".join(f"<p>{p}</p>" for p in out.split("\n\n") if p.strip())


def docs_page(openapi: dict[str, Any]) -> tuple[str, str]:
    """The API reference page of an OpenAPI schema, and its Content-Security-Policy."""
    components = openapi.get("components", {}).get("schemas", {})
    info = openapi.get("info", {})
    parts = [
        f"<h1>{html.escape(info.get('title', 'API'))} {html.escape(info.get('version', ''))}</h1>",
        _markdown_code(info.get("description", "")),
        "<p>The machine-readable schema: <a href=\"openapi.json\">openapi.json</a>.</p>",
    ]
    for path, ops in openapi.get("paths", {}).items():
        for method, op in ops.items():
            parts.append('<div class="op">')
            parts.append(f'<h2 id="{html.escape(op.get("operationId", path))}"><span '
                         f'class="method">{method.upper()}</span> <code>{html.escape(path)}'
                         f'</code></h2>')  # fmt: skip
            parts.append(f"<p><b>{html.escape(op.get('summary', ''))}</b></p>")
            parts.append(_markdown_code(op.get("description", "")))
            params = op.get("parameters", [])
            if params:
                rows = "".join(
                    f"<tr><td><code>{html.escape(p['name'])}</code></td>"
                    f"<td>{html.escape(p.get('in', ''))}</td>"
                    f"<td>{html.escape(_schema_text(p.get('schema', {}), components))}</td>"
                    f"<td>{html.escape(json.dumps(p.get('schema', {}).get('default')))}</td>"
                    f"<td>{html.escape(p.get('description', ''))}</td></tr>"
                    for p in params
                )
                parts.append("<table><tr><th>parameter</th><th>in</th><th>type</th>"
                             f"<th>default</th><th>meaning</th></tr>{rows}</table>")  # fmt: skip
            body = op.get("requestBody", {}).get("content", {})
            if body:
                kinds = ", ".join(f"<code>{html.escape(k)}</code>" for k in body)
                parts.append(f"<p>Request body: {kinds}</p>")
            answers = "".join(
                f"<tr><td>{html.escape(code)}</td><td>{html.escape(r.get('description', ''))}"
                f"</td><td>{', '.join(html.escape(k) for k in r.get('content', {}))}</td></tr>"
                for code, r in op.get("responses", {}).items()
            )
            parts.append("<table><tr><th>status</th><th>meaning</th><th>content</th></tr>"
                         f"{answers}</table>")  # fmt: skip
            parts.append("</div>")
    for name, schema in components.items():
        props = schema.get("properties", {})
        if not props or name.startswith(("HTTPValidationError", "ValidationError")):
            continue
        rows = "".join(
            f"<tr><td><code>{html.escape(k)}</code></td>"
            f"<td>{html.escape(_schema_text(v, components))}</td>"
            f"<td>{html.escape(v.get('description', ''))}</td></tr>"
            for k, v in props.items()
        )
        parts.append(f'<h2 id="{html.escape(name)}">{html.escape(name)}</h2>'
                     f"<p>{html.escape(schema.get('description', ''))}</p>"
                     f"<table><tr><th>field</th><th>type</th><th>meaning</th></tr>{rows}</table>")
    page = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(info.get('title', 'API'))}: API</title>\n"
        f"<style>{DOCS_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body>\n</html>\n"
    )
    return page, csp(styles=(DOCS_STYLE,))
