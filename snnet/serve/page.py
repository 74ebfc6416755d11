"""``GET /``: one self-contained page (plain HTML + JS, no dependency) over ``/stitches``, ``/stats``
and ``/predict``: the measured Pareto plot with the current stitch marked, a budget slider over the
front, and an image upload that shows the top-5 and the stitch that answered."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>snnet serve</title>
<style>
 body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;max-width:1100px}
 h1{font-size:1.3em;margin:0 0 .3em} .row{display:flex;gap:2em;flex-wrap:wrap}
 .card{border:1px solid #ddd;border-radius:6px;padding:.8em 1em;margin:.5em 0}
 svg text{font-size:11px} .bar{background:#4878b0;height:14px;display:inline-block;vertical-align:middle}
 td{padding:1px 8px} .muted{color:#777;font-size:.9em} #error{color:#b00}
</style></head><body>
<h1>snnet serve: one stitchable network, every budget</h1>
<div class="muted" id="policy">loading...</div>
<div class="row">
 <div class="card" style="max-width:560px"><svg id="plot" width="560" height="360"></svg>
  <div class="muted">dots: measured stitches (GFLOPs, top-1); line: Pareto front; ring: stitch the policy serves now;
   square: the budget's choice; star: anchors</div></div>
 <div class="card" style="width:360px">
  <div><b>Budget</b> (max GFLOPs over the front):
   <input type="range" id="budget" min="0" max="0" value="0" style="width:100%">
   <div id="budgetText"></div>
   <label><input type="checkbox" id="useBudget" checked> send this budget (unchecked: the policy decides)</label></div>
  <div style="margin-top:1em"><b>Image</b>: <input type="file" id="file" accept="image/*"></div>
  <div class="muted"><label>API key <input id="key" size="14"></label></div>
  <div id="error"></div>
  <div id="answer"></div>
  <div style="margin-top:1em"><b>Stats</b> <span class="muted" id="stats"></span></div>
 </div>
</div>
<script>
const $ = id => document.getElementById(id);
let table = null, front = [], answered = null;
const headers = () => $('key').value ? {'X-API-Key': $('key').value} : {};
async function getJSON(url) {
  const r = await fetch(url, {headers: headers()});
  if (!r.ok) throw new Error(url + ': ' + r.status + ' ' + (await r.text()));
  return r.json();
}
function paretoFront(rows, metric) {
  const sorted = rows.filter(r => r[metric] !== null).sort((a, b) => a.gflops - b.gflops || b[metric] - a[metric]);
  const out = []; let best = -Infinity;
  for (const r of sorted) if (r[metric] > best) { out.push(r); best = r[metric]; }
  return out;
}
function budgetChoice() { return front[+$('budget').value]; }
function draw() {
  const svg = $('plot'), W = 560, H = 360, m = {l: 50, r: 30, t: 15, b: 40}, metric = table.metric;
  const rows = table.stitches.filter(r => r[metric] !== null);
  const xs = rows.map(r => r.gflops), ys = rows.map(r => r[metric]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const px = v => m.l + (v - x0) / ((x1 - x0) || 1) * (W - m.l - m.r);
  const py = v => H - m.b - (v - y0) / ((y1 - y0) || 1) * (H - m.t - m.b);
  let s = `<line x1="${m.l}" y1="${H - m.b}" x2="${W - m.r}" y2="${H - m.b}" stroke="#888"/>` +
          `<line x1="${m.l}" y1="${m.t}" x2="${m.l}" y2="${H - m.b}" stroke="#888"/>`;
  for (let i = 0; i <= 4; i++) {
    const gx = x0 + (x1 - x0) * i / 4, gy = y0 + (y1 - y0) * i / 4;
    s += `<text x="${px(gx)}" y="${H - m.b + 14}" text-anchor="middle">${gx.toPrecision(3)}</text>`;
    s += `<text x="${m.l - 4}" y="${py(gy) + 4}" text-anchor="end">${gy.toFixed(1)}</text>`;
  }
  s += `<text x="${(W + m.l) / 2}" y="${H - 6}" text-anchor="middle">GFLOPs per image</text>`;
  s += `<text x="12" y="${H / 2}" transform="rotate(-90 12 ${H / 2})" text-anchor="middle">${metric} (%)</text>`;
  s += `<polyline fill="none" stroke="#4878b0" points="${front.map(r => px(r.gflops) + ',' + py(r[metric])).join(' ')}"/>`;
  for (const r of rows) {
    const cls = r.is_anchor ? 'anchor' : 'stitch';
    s += r.is_anchor
      ? `<text class="${cls}" data-id="${r.id}" x="${px(r.gflops)}" y="${py(r[metric]) + 5}" text-anchor="middle" fill="#c33" font-size="16">&#9733;</text>`
      : `<circle class="${cls}" data-id="${r.id}" cx="${px(r.gflops)}" cy="${py(r[metric])}" r="4" fill="#4878b0" opacity=".75"><title>${r.id}: ${r.name}</title></circle>`;
  }
  const mark = (id, shape) => {
    const r = table.stitches.find(t => t.id === id); if (!r || r[metric] === null) return;
    s += shape === 'ring'
      ? `<circle id="current" data-id="${id}" cx="${px(r.gflops)}" cy="${py(r[metric])}" r="10" fill="none" stroke="#e08000" stroke-width="2.5"/>`
      : `<rect id="chosen" data-id="${id}" x="${px(r.gflops) - 7}" y="${py(r[metric]) - 7}" width="14" height="14" fill="none" stroke="#2a2" stroke-width="2"/>`;
  };
  const current = table.policy.current ?? table.policy.stitch;
  mark(current, 'ring');
  if ($('useBudget').checked && front.length) mark(budgetChoice().id, 'square');
  svg.innerHTML = s;
  const b = budgetChoice();
  $('budgetText').textContent = b ? `max_gflops ${b.gflops.toPrecision(4)} -> stitch ${b.id} (${b.name}), ${metric} ${b[metric].toFixed(2)}%` : '';
}
async function refresh() {
  try {
    table = await getJSON('/stitches');
    front = paretoFront(table.stitches, table.metric);
    $('budget').max = front.length - 1;
    if (!$('budget').dataset.touched) $('budget').value = front.length - 1;
    const p = table.policy;
    $('policy').textContent = p.policy === 'slo'
      ? `policy: slo ${p.slo_ms} ms, serving stitch ${p.current} now (candidates ${p.candidates.join(', ')})`
      : `policy: fixed stitch ${p.stitch}`;
    draw();
    const st = await getJSON('/stats');
    $('stats').textContent = `${st.requests} requests, p50 ${st.p50_ms ?? '-'} ms, p95 ${st.p95_ms ?? '-'} ms, ${st.errors} refused`;
    $('error').textContent = '';
  } catch (e) { $('error').textContent = String(e); }
}
$('budget').oninput = () => { $('budget').dataset.touched = 1; draw(); };
$('useBudget').onchange = draw;
$('file').onchange = async () => {
  const f = $('file').files[0]; if (!f) return;
  const form = new FormData(); form.append('image', f);
  if ($('useBudget').checked && front.length) form.append('max_gflops', budgetChoice().gflops);
  const r = await fetch('/predict', {method: 'POST', body: form, headers: headers()});
  const out = await r.json();
  if (!r.ok) { $('error').textContent = `${r.status}: ${out.detail}`; return; }
  const s = out.stitch;
  $('answer').innerHTML = `<p>stitch <b>${s.id}</b> (${s.name}), ${s.gflops.toPrecision(3)} GFLOPs, top-1 ${s[table.metric]?.toFixed(2)}%,
    chosen by ${out.chosen_by}, ${out.time_ms.toFixed(1)} ms</p><table id="top">` +
    out.top.map(t => `<tr><td>${t.name}</td><td><span class="bar" style="width:${Math.round(t.prob * 150)}px"></span></td><td>${(100 * t.prob).toFixed(1)}%</td></tr>`).join('') + '</table>';
  refresh();
};
$('key').value = new URLSearchParams(location.search).get('key') || '';  // /?key=... opens a keyed server
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
