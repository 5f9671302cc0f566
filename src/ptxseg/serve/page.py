"""The two pages ``ptxseg serve`` shows a person, both self-contained: no file, font or script
is loaded from anywhere (a hospital network reaches no CDN), and the Content-Security-Policy
of each says so to the browser (:func:`csp`: the page's own inline script and style by hash,
images from ``data:`` URLs, requests to the service itself only).

- ``GET /`` (:func:`viewer_page`): the same page for every service (it asks ``/v1/model``
  what it serves; with a token, it first asks the person for it, keeps it in the tab's
  session storage and sends it in the ``Authorization`` header only, never in an address).
  Drop or choose a radiograph (PNG, JPEG, DICOM); the page posts it to ``/v1/predict`` and
  draws, at the image's size, the radiograph with the service's own mask tinted, pixel for
  pixel: the picture is the finding. A threshold slider explores other thresholds in the page
  from the returned reduced probability map (no new request), without the rule's removal of
  small components, and the page labels that view as such; links download the service's mask
  and overlay and the view as drawn.
- ``GET /docs`` (:func:`docs_page`): the API reference, rendered on the server from the
  OpenAPI schema (markdown code spans as code; FastAPI's own Swagger UI loads its script from
  a CDN), with each route's curl example (its ``x-codeSamples``) at the service's address and
  a "try it" form that sends real requests from the page; the schema itself is at
  ``/openapi.json``.
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
#login input { width: 100%; margin: 6px 0; padding: 6px; font: inherit; }
.note.exploring { color: var(--accent); font-weight: 600; }
button { font: inherit; padding: 4px 10px; border-radius: 6px; border: 1px solid var(--line);
         background: var(--panel); color: inherit; cursor: pointer; }
[hidden] { display: none !important; }
"""

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const TINT = [213, 94, 0];  // Okabe-Ito vermillion, the overlays' prediction colour
const AUTH = document.body.dataset.auth === "bearer";
const TOKEN_KEY = "ptxseg-token";  // sessionStorage: this tab only, never in a URL
let model = null, result = null, preview = null, map = null, mask = null, stem = "image";
let ruleSlider = null;  // the slider's value at the rule's threshold (its step may round it)

function setState(state, text) {
  document.body.dataset.state = state;
  $("status").textContent = text;
}

function authHeaders() {
  const token = AUTH ? sessionStorage.getItem(TOKEN_KEY) : null;
  return token ? {Authorization: "Bearer " + token} : {};
}

function askToken(text) {
  sessionStorage.removeItem(TOKEN_KEY);
  $("login").hidden = false;
  $("file").disabled = true;
  setState("login", text);
  $("token").focus();
}

function loadImage(b64) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("cannot decode an image of the answer"));
    img.src = "data:image/png;base64," + b64;
  });
}

function grayValues(img) {
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

// the region where inside(x, y), tinted (its edge opaque), as a canvas of w x h
function regionLayer(w, h, inside) {
  const layer = new ImageData(w, h);
  let count = 0;
  const at = (x, y) => x >= 0 && y >= 0 && x < w && y < h && inside(x, y);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      if (!inside(x, y)) continue;
      count++;
      const edge = !at(x - 1, y) || !at(x + 1, y) || !at(x, y - 1) || !at(x, y + 1);
      const o = 4 * (y * w + x);
      layer.data[o] = TINT[0]; layer.data[o + 1] = TINT[1]; layer.data[o + 2] = TINT[2];
      layer.data[o + 3] = edge ? 255 : 90;
    }
  }
  const c = document.createElement("canvas");
  c.width = w; c.height = h;
  c.getContext("2d").putImageData(layer, 0, 0);
  return {canvas: c, count};
}

// At the rule's threshold the view is the service's own mask, pixel for pixel at the image's
// size (what the finding, area and overlay say). At any other threshold it is the reduced
// probability map above that threshold, without the rule's removal of small components, and
// the page says so.
function draw() {
  if (!result) return;
  const t = parseFloat($("threshold").value);
  const rule = ruleThreshold(result.thresholds);
  const service = $("threshold").value === ruleSlider;
  $("tvalue").textContent = service ? `${rule} (the rule)` : t.toFixed(2);
  const view = $("view"), ctx = view.getContext("2d");
  view.width = result.width; view.height = result.height;
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(preview, 0, 0, view.width, view.height);
  let layer;
  if (service) {
    const v = mask.values;
    layer = regionLayer(mask.width, mask.height, (x, y) => v[y * mask.width + x] > 127);
  } else {
    const cut = Math.floor(t * 255 + 1e-6);  // value / 255 > t  <=>  value > floor(255 t)
    layer = regionLayer(map.width, map.height, (x, y) => map.values[y * map.width + x] > cut);
  }
  ctx.drawImage(layer.canvas, 0, 0, view.width, view.height);
  const px = layer.count, all = (service ? mask.width * mask.height : map.width * map.height);
  const share = (100 * px / all).toFixed(1);
  if (service) {
    $("above").textContent = `the service's mask: ${px.toLocaleString()} px (${share} %)`;
    $("viewnote").textContent = "This view is the service's mask (the rule above, at the "
      + "image's size): the finding, area and overlay are this region.";
  } else {
    $("above").textContent = px
      ? `${share} % of the reduced map above ${t.toFixed(2)}`
      : `no pixel of the reduced map above ${t.toFixed(2)}`;
    $("viewnote").textContent = `Exploring: pixels above ${t.toFixed(2)} in the reduced `
      + `probability map (${map.width} px), without the rule's removal of small components. `
      + `Not the service's finding: back to ${rule} for it.`;
  }
  view.dataset.source = service ? "service-mask" : "probability-map";
  view.dataset.threshold = t.toFixed(2);
  view.dataset.above = String(px);
  $("viewnote").className = "note" + (service ? "" : " exploring");
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
  row(dl, "max probability", r.max_prob === null ? "not a number" : r.max_prob.toFixed(3));
  row(dl, "area", r.area_cm2 === null
      ? `${r.area_px.toLocaleString()} px (cm² unknown: ${r.area_note})`
      : `${r.area_cm2.toFixed(1)} cm² (${r.area_px.toLocaleString()} px; ${r.area_note})`);
  row(dl, "side", r.side + (r.side_basis ? ` (${r.side_basis})` : ""));
  row(dl, "rule", model.thresholds_rule);
  row(dl, "time", `${r.seconds.toFixed(2)} s in the service`);
}

function link(id, href, name) {
  const a = $(id);
  a.href = href; a.download = name;
  a.removeAttribute("aria-disabled");
}

function describe(m) {
  const what = m.ensemble_size > 1
    ? `a ${m.ensemble_size}-member ensemble (${m.combine}) of ${m.architecture}/${m.encoder}`
    : `${m.architecture}/${m.encoder}`;
  return `run ${m.run}: ${what}, ${m.input_size} px, tta ${m.tta}, ptxseg ${m.version}`;
}

async function loadModel() {
  let r, body;
  try {
    r = await fetch("v1/model", {headers: authHeaders()});
    body = await r.json();
  } catch (e) {
    setState("error", `no answer from the service (${e.message})`);
    return;
  }
  if (r.status === 401) {
    askToken(sessionStorage.getItem(TOKEN_KEY) ? "the token was refused: enter it again"
                                                : "this service needs its token");
    return;
  }
  if (!r.ok) {
    setState("error", `${r.status}: ${body.detail}`);
    return;
  }
  model = body;
  $("model").textContent = describe(model);
  $("rule").textContent = `Rule of the service: ${model.thresholds_rule}`;
  $("login").hidden = true;
  $("file").disabled = false;
  setState("idle", "no image yet");
}

async function send(file) {
  if (!file || !model) return;
  stem = (file.name || "image").replace(/\.[^.]*$/, "") || "image";
  setState("busy", `analysing ${file.name} (${(file.size / 1e6).toFixed(1)} MB) ...`);
  const form = new FormData();
  form.append("file", file, file.name || "upload");
  let r, body;
  try {
    r = await fetch("v1/predict", {method: "POST", body: form, headers: authHeaders()});
    body = await r.json();
  } catch (e) {
    setState("error", `no answer from the service (${e.message})`);
    return;
  }
  if (r.status === 401) {
    askToken("the token was refused: enter it again");
    return;
  }
  if (!r.ok) {
    setState("error", `${r.status}: ${body.detail}`);
    return;
  }
  try {
    [preview, map, mask] = await Promise.all([
      loadImage(body.preview_png),
      loadImage(body.probability_map.png).then(grayValues),
      loadImage(body.mask_png).then(grayValues),
    ]);
  } catch (e) {
    setState("error", e.message);
    return;
  }
  result = body;
  $("threshold").value = ruleThreshold(body.thresholds);
  ruleSlider = $("threshold").value;
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
$("reset").addEventListener("click", () => {
  if (!result) return;
  $("threshold").value = ruleSlider;
  draw();
});
$("dl-view").addEventListener("click", () => {
  const t = $("threshold").value;
  link("dl-view", $("view").toDataURL("image/png"), `${stem}_view_t${t}.png`);
});
$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  const token = $("token").value.trim();
  $("token").value = "";
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    loadModel();
  }
});
$("file").disabled = true;
setState("idle", "connecting to the service ...");
loadModel();
"""

VIEWER = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ptxseg: pneumothorax segmentation</title>
<style>{style}</style>
</head>
<body data-state="idle" data-auth="{auth}">
<header>
<h1>ptxseg: pneumothorax segmentation</h1>
<p id="model"></p>
<p id="rule"></p>
<p>Research use only: not for diagnosis. Images are analysed in memory and not kept.</p>
</header>
<main>
<section>
<form id="login" class="panel" hidden>
<label for="token">Token of this service</label>
<input id="token" type="password" autocomplete="off" spellcheck="false">
<button type="submit">Use</button>
<p class="note">Ask whoever runs the service for it. It stays in this browser tab (session
storage, gone when the tab closes) and is sent only in the Authorization header of this page's
requests: never in an address or a log.</p>
</form>
<label id="drop" for="file">Drop a chest radiograph here (PNG, JPEG or DICOM), or choose one:
<input id="file" type="file"
 accept=".png,.jpg,.jpeg,.dcm,.dicom,image/png,image/jpeg,application/dicom">
</label>
<p id="status" role="status" aria-live="polite"></p>
<canvas id="view" width="512" height="512" hidden
 aria-label="radiograph with the predicted region"></canvas>
<p id="viewnote" class="note" aria-live="polite"></p>
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
<button id="reset" type="button">back to the service's mask</button>
<p class="note">At the rule's threshold the picture is the service's mask. Elsewhere the slider
redraws the region in this page from the reduced probability map (pixels above the threshold),
without the rule's removal of small components: an exploration, not the finding.</p>
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


def viewer_page(*, auth: bool = False) -> tuple[str, str]:
    """The viewer (``GET /``) and its Content-Security-Policy. The page holds no model data:
    it asks ``/v1/model`` (with the token the person types in, where ``auth``) and shows it."""
    page = VIEWER.format(style=STYLE, script=SCRIPT, auth="bearer" if auth else "none")
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
#try { border: 2px solid #0072b2; border-radius: 8px; padding: 8px 14px; margin: 14px 0; }
#try label { margin-right: 14px; }
#try-out { max-height: 420px; white-space: pre-wrap; overflow-wrap: anywhere; }
"""

DOCS_SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);

function authHeaders() {
  const field = $("try-token");
  const token = field ? field.value.trim() : "";
  return token ? {Authorization: "Bearer " + token} : {};
}

// long base64 strings cut in the shown JSON (the answer itself is untouched)
function shorten(key, value) {
  return typeof value === "string" && value.length > 120
    ? `${value.slice(0, 48)}... (${value.length.toLocaleString()} characters)` : value;
}

async function show(r) {
  const type = r.headers.get("content-type") || "";
  let text;
  const link = $("try-download");
  link.hidden = true;
  if (type.startsWith("application/json")) {
    text = JSON.stringify(await r.json(), shorten, 2);
  } else {
    const blob = await r.blob();
    text = `${blob.size.toLocaleString()} bytes of ${type}`;
    if (r.ok) {
      link.href = URL.createObjectURL(blob);
      link.hidden = false;
    }
  }
  $("try-out").textContent = `HTTP ${r.status}\n${text}`;
  document.body.dataset.tried = String(r.status);
}

async function call(method, path, body) {
  $("try-out").textContent = `${method} ${path} ...`;
  try {
    await show(await fetch(path, {method, body, headers: authHeaders()}));
  } catch (e) {
    $("try-out").textContent = `no answer from the service (${e.message})`;
  }
}

$("try-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const file = $("try-file").files[0];
  if (!file) {
    $("try-out").textContent = "choose an image first";
    return;
  }
  const form = new FormData();
  form.append("file", file, file.name);
  const query = new URLSearchParams({format: $("try-format").value,
                                     images: String($("try-images").checked)});
  call("POST", "v1/predict?" + query, form);
});
$("try-model").addEventListener("click", () => call("GET", "v1/model"));
$("try-health").addEventListener("click", () => call("GET", "healthz"));
"""

#: the base URL the OpenAPI code samples are written with; the page shows the request's own
EXAMPLE_BASE = "http://127.0.0.1:8000"


def _schema_text(schema: dict[str, Any], components: dict[str, Any]) -> str:
    """A short type for a parameter's schema: ``string``, ``json | dicom-seg``, ``boolean``."""
    if "$ref" in schema:
        schema = components.get(schema["$ref"].rsplit("/", 1)[-1], {})
    if "enum" in schema:
        return " | ".join(str(v) for v in schema["enum"])
    if "anyOf" in schema:
        return " | ".join(_schema_text(s, components) for s in schema["anyOf"])
    return str(schema.get("type", "object"))


def _inline(text: str) -> str:
    """Escaped ``text`` with its markdown ``code`` spans as ``<code>``: no backtick is shown."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _markdown_code(text: str) -> str:
    """:func:`_inline` in paragraphs (blank lines)."""
    return "".join(f"<p>{_inline(p)}</p>" for p in text.split("\n\n") if p.strip())


def _try_form(auth: bool) -> str:
    """The "try it" form: an image to ``POST /v1/predict``, two buttons for the GETs."""
    token = ('<p><label for="try-token">Token</label> <input id="try-token" type="password" '
             'autocomplete="off" spellcheck="false"> (sent in the Authorization header only)'
             "</p>") if auth else ""  # fmt: skip
    return (
        '<section id="try"><h2>Try it</h2>'
        "<p>Sends real requests to this service from this page.</p>"
        f'<form id="try-form">{token}<p><label>Image <input id="try-file" type="file" '
        'accept=".png,.jpg,.jpeg,.dcm,.dicom"></label><label>format <select id="try-format">'
        '<option>json</option><option>dicom-seg</option></select></label><label><input '
        'id="try-images" type="checkbox"> images</label><button type="submit">POST '
        "/v1/predict</button></p></form>"
        '<p><button id="try-model" type="button">GET /v1/model</button> <button '
        'id="try-health" type="button">GET /healthz</button> <a id="try-download" '
        'download="seg.dcm" hidden>download the answer</a></p>'
        '<pre id="try-out" aria-live="polite">(no request yet)</pre></section>'
    )


def docs_page(openapi: dict[str, Any], *, base_url: str = EXAMPLE_BASE + "/",
              auth: bool = False) -> tuple[str, str]:  # fmt: skip
    """The API reference page of an OpenAPI schema (its operations' ``x-codeSamples`` shown
    with ``base_url``, the service's address as the browser reached it) with a "try it" form
    (a token field where ``auth``), and its Content-Security-Policy."""
    components = openapi.get("components", {}).get("schemas", {})
    info = openapi.get("info", {})
    base = base_url.rstrip("/")
    parts = [
        f"<h1>{html.escape(info.get('title', 'API'))} {html.escape(info.get('version', ''))}</h1>",
        _markdown_code(info.get("description", "")),
        "<p>The machine-readable schema: <a href=\"openapi.json\">openapi.json</a>. Contents: "
        + ", ".join(f'<a href="#{html.escape(op.get("operationId", path))}">'
                    f"{method.upper()} {html.escape(path)}</a>"
                    for path, ops in openapi.get("paths", {}).items()
                    for method, op in ops.items())
        + ', <a href="#try">try it</a>.</p>',
    ]  # fmt: skip
    if auth:
        parts.append(
            "<p><b>Token.</b> This service needs <code>Authorization: Bearer &lt;token&gt;</code>"
            " on every request but <code>/healthz</code> and these pages (401 without it). The "
            "examples read it from the environment variable <code>PTXSEG_TOKEN</code>.</p>"
        )
    parts.append(_try_form(auth))
    for path, ops in openapi.get("paths", {}).items():
        for method, op in ops.items():
            parts.append('<div class="op">')
            parts.append(f'<h2 id="{html.escape(op.get("operationId", path))}"><span '
                         f'class="method">{method.upper()}</span> <code>{html.escape(path)}'
                         f'</code></h2>')  # fmt: skip
            parts.append(f"<p><b>{_inline(op.get('summary', ''))}</b></p>")
            parts.append(_markdown_code(op.get("description", "")))
            params = op.get("parameters", [])
            if params:
                rows = "".join(
                    f"<tr><td><code>{html.escape(p['name'])}</code></td>"
                    f"<td>{html.escape(p.get('in', ''))}</td>"
                    f"<td>{html.escape(_schema_text(p.get('schema', {}), components))}</td>"
                    f"<td>{html.escape(json.dumps(p.get('schema', {}).get('default')))}</td>"
                    f"<td>{_inline(p.get('description', ''))}</td></tr>"
                    for p in params
                )
                parts.append("<table><tr><th>parameter</th><th>in</th><th>type</th>"
                             f"<th>default</th><th>meaning</th></tr>{rows}</table>")  # fmt: skip
            body = op.get("requestBody", {}).get("content", {})
            if body:
                kinds = ", ".join(f"<code>{html.escape(k)}</code>" for k in body)
                parts.append(f"<p>Request body: {kinds}</p>")
            answers = "".join(
                f"<tr><td>{html.escape(code)}</td><td>{_inline(r.get('description', ''))}"
                f"</td><td>{', '.join(html.escape(k) for k in r.get('content', {}))}</td></tr>"
                for code, r in op.get("responses", {}).items()
            )
            parts.append("<table><tr><th>status</th><th>meaning</th><th>content</th></tr>"
                         f"{answers}</table>")  # fmt: skip
            samples = [x.get("source", "") for x in op.get("x-codeSamples", [])]
            if samples:
                text = "\n".join(samples).replace(EXAMPLE_BASE, base)
                parts.append(f"<p>Example:</p><pre>{html.escape(text)}</pre>")
            parts.append("</div>")
    for name, schema in components.items():
        props = schema.get("properties", {})
        if not props or name.startswith(("HTTPValidationError", "ValidationError")):
            continue
        rows = "".join(
            f"<tr><td><code>{html.escape(k)}</code></td>"
            f"<td>{html.escape(_schema_text(v, components))}</td>"
            f"<td>{_inline(v.get('description', ''))}</td></tr>"
            for k, v in props.items()
        )
        parts.append(f'<h2 id="{html.escape(name)}">{html.escape(name)}</h2>'
                     f"<p>{_inline(schema.get('description', ''))}</p>"
                     f"<table><tr><th>field</th><th>type</th><th>meaning</th></tr>{rows}</table>")
    page = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(info.get('title', 'API'))}: API</title>\n"
        f"<style>{DOCS_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(parts)
        + f"\n<script>{DOCS_SCRIPT}</script>\n</body>\n</html>\n"
    )
    return page, csp(scripts=(DOCS_SCRIPT,), styles=(DOCS_STYLE,))
