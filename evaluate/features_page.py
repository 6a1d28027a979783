"""The offline page of `evaluate features`: index.html, app.js, style.css and data/ as JS files.

Browsers refuse fetch() from file://, so every data file is a script that hands its JSON to
FB.loaded(key, data); the page adds a script tag for a file when it first needs it. data/saes.js
and data/vocab.js load with the page; data/s<k>/index.js (one array per column, every latent)
when an SAE's table is shown; data/s<k>/c<n>.js (CHUNK latents' full records) when one of them
is viewed. No network, no CDN: everything is in the folder. User text (token strings, names) is
set with textContent, never parsed as HTML.
"""
from __future__ import annotations

import json
from pathlib import Path

from .features_out import CHUNK, index_record, latent_record


def _js(key: str, data) -> str:
    return f"FB.loaded({json.dumps(key)}, {json.dumps(data, separators=(',', ':'))});\n"


def write_page(build: Path, per_sae, cfg, ctx, vocab: dict, summary: dict, store=None) -> None:
    data = build / "data"
    data.mkdir()
    saes = []
    for k, (src, logits, nb) in enumerate(per_sae):
        folder = data / f"s{k}"
        folder.mkdir()
        (folder / "index.js").write_text(_js(f"s{k}/index", index_record(src, cfg, ctx, logits)))
        F = src.sae.cfg.d_sae
        for c in range(0, F, CHUNK):
            recs = [latent_record(src, f, cfg, ctx, logits, nb) for f in range(c, min(c + CHUNK, F))]
            (folder / f"c{c // CHUNK}.js").write_text(_js(f"s{k}/c{c // CHUNK}", recs))
        saes.append({"name": src.name, "site": src.site, "arch": src.sae.cfg.arch, "d_sae": F,
                     "rows": int(src.stats["rows"]), "logits": logits is not None})
    meta = {"saes": saes, "edges": summary["hist_edges"], "store": summary["store"], "top": cfg.top,
            "bands": cfg.bands, "pos0": cfg.pos0, "chunk": CHUNK}
    (data / "saes.js").write_text(_js("saes", meta))
    (data / "vocab.js").write_text(_js("vocab", vocab))
    (build / "index.html").write_text(INDEX_HTML)
    (build / "app.js").write_text(APP_JS)
    (build / "style.css").write_text(STYLE_CSS)


INDEX_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'self' 'unsafe-inline'; connect-src 'none'">
<title>SAE feature browser</title><link rel="stylesheet" href="style.css">
<script src="app.js"></script><script src="data/saes.js"></script><script src="data/vocab.js"></script>
</head><body>
<header><b>SAE feature browser</b> <select id="sae"></select> <span id="saeinfo"></span></header>
<div id="error"></div>
<main id="view"></main>
</body></html>
"""

STYLE_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222}
header{background:#23395d;color:#fff;padding:8px 14px}header select{margin-left:12px}
#saeinfo{margin-left:12px;opacity:.8;font-size:12px}main{padding:10px 14px}#error{color:#b00;padding:0 14px}
table{border-collapse:collapse;width:100%}th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;
vertical-align:middle}th{cursor:pointer;background:#f4f6f9;user-select:none;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr:hover td{background:#fafbff}
a{color:#1a56b0;text-decoration:none}.tok{white-space:pre;border-radius:2px;padding:0 1px;font-family:ui-monospace,monospace;font-size:12.5px}
.ctx{margin:2px 0;line-height:1.9;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
#latents td.tok{max-width:24em;overflow:hidden;text-overflow:ellipsis}.center{outline:1.5px solid #333}.val{display:inline-block;width:62px;
color:#666;font-size:12px}.grid{display:grid;grid-template-columns:1fr 1fr 1fr;gap:16px}h2{margin:6px 0}
h3{margin:14px 0 4px;font-size:15px}.muted{color:#777;font-size:12px}.pos{color:#0a7a2f}.neg{color:#b3261e}
.bar{fill:#e07a1f}.pager button{margin:0 6px}#q{width:260px;padding:3px}
"""

APP_JS = r"""'use strict';
var FB = {cache: {}, waiting: {}, loaded: function (key, data) {
  FB.cache[key] = data; var cbs = FB.waiting[key] || []; delete FB.waiting[key];
  cbs.forEach(function (cb) { cb(data); });
}};
var PAGE = 200, state = {sort: 'i', desc: false, q: '', page: 0};

function load(key, cb) {
  if (key in FB.cache) { cb(FB.cache[key]); return; }
  if (FB.waiting[key]) { FB.waiting[key].push(cb); return; }
  FB.waiting[key] = [cb];
  var s = document.createElement('script');
  s.src = 'data/' + key + '.js';
  s.onerror = function () { fail('missing data file data/' + key + '.js'); };
  document.head.appendChild(s);
}
function el(tag, text, cls) {
  var e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function fail(msg) { document.getElementById('error').textContent = msg; }
function tok(id) { var v = FB.cache.vocab[String(id)]; return v === undefined ? '<' + id + '>' : v; }
// newlines as a visible mark, runs of 3+ spaces (code indentation) as a count, so contexts stay short
function showTok(id) { return tok(id).replace(/\n/g, '\u21b5').replace(/ {3,}/g, function (m) { return '\u2423' + m.length; }); }
function fmt(x) { return x === null || x === undefined ? '-' : (Math.abs(x) >= 1e4 || (x !== 0 && Math.abs(x) < 1e-3)) ? x.toExponential(2) : (+x.toPrecision(4)).toString(); }
function route() {
  var h = {}; location.hash.replace(/^#/, '').split('&').forEach(function (kv) {
    var p = kv.split('='); if (p[0]) h[p[0]] = decodeURIComponent(p[1] || ''); });
  return h;
}
function go(sae, latent) { location.hash = 'sae=' + sae + (latent === undefined ? '' : '&latent=' + latent); }

function svgHist(counts, w, h, titles) {
  var ns = 'http://www.w3.org/2000/svg', svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('width', w); svg.setAttribute('height', h);
  var mx = Math.max.apply(null, counts.concat([1])), bw = w / Math.max(counts.length, 1);
  counts.forEach(function (c, i) {
    var r = document.createElementNS(ns, 'rect'), bh = c ? Math.max(1, h * c / mx) : 0;
    r.setAttribute('x', i * bw); r.setAttribute('width', Math.max(bw - 1, 1));
    r.setAttribute('y', h - bh); r.setAttribute('height', bh); r.setAttribute('class', 'bar');
    if (titles) { var t = document.createElementNS(ns, 'title'); t.textContent = titles[i]; r.appendChild(t); }
    svg.appendChild(r);
  });
  return svg;
}

function showIndex(k, ix) {
  var view = document.getElementById('view'); view.textContent = '';
  var bar = el('div'); var q = el('input'); q.id = 'q'; q.placeholder = 'search: latent number or token';
  q.value = state.q; bar.appendChild(q); var count = el('span', '', 'muted'); count.id = 'count';
  bar.appendChild(count); view.appendChild(bar);
  var table = el('table'); table.id = 'latents'; var head = el('tr');
  [['i', 'latent'], ['density', 'density'], ['mean', 'mean act'], ['max', 'max act'], [null, 'top tokens'],
   [null, 'top logits'], [null, 'histogram']].forEach(function (c) {
    var th = el('th', c[1] + (state.sort === c[0] ? (state.desc ? ' \u25bc' : ' \u25b2') : ''));
    if (c[0]) { th.dataset.sort = c[0]; th.onclick = function () {
      state.desc = state.sort === c[0] ? !state.desc : c[0] !== 'i'; state.sort = c[0]; state.page = 0; showIndex(k, ix); }; }
    head.appendChild(th);
  });
  table.appendChild(head); view.appendChild(table);
  var pager = el('div', '', 'pager'); view.appendChild(pager);
  var words = function (ids) { return (ids || []).map(showTok).join(' \u00b7 '); };
  function rows() {
    var n = ix.d_sae, order = [], needle = state.q.trim().toLowerCase();
    for (var i = 0; i < n; i++) {
      if (needle && String(i) !== needle && words(ix.toptok[i]).toLowerCase().indexOf(needle) < 0 &&
          (!ix.toplogit || words(ix.toplogit[i]).toLowerCase().indexOf(needle) < 0)) continue;
      order.push(i);
    }
    var key = state.sort, sign = state.desc ? -1 : 1;
    order.sort(function (a, b) { var x = key === 'i' ? a : ix[key][a], y = key === 'i' ? b : ix[key][b];
      return x === y ? a - b : sign * (x < y ? -1 : 1); });
    while (table.rows.length > 1) table.deleteRow(1);
    var from = state.page * PAGE, to = Math.min(order.length, from + PAGE);
    order.slice(from, to).forEach(function (i) {
      var tr = el('tr'); tr.dataset.latent = i;
      var a = el('a', i); a.href = '#sae=' + k + '&latent=' + i; var td = el('td', '', 'num'); td.appendChild(a); tr.appendChild(td);
      tr.appendChild(el('td', fmt(ix.density[i]), 'num')); tr.appendChild(el('td', fmt(ix.mean[i]), 'num'));
      tr.appendChild(el('td', fmt(ix.max[i]), 'num')); tr.appendChild(el('td', words(ix.toptok[i]), 'tok'));
      tr.appendChild(el('td', ix.toplogit ? words(ix.toplogit[i]) : '-', 'tok'));
      var h = el('td'); h.appendChild(svgHist(ix.mini[i][1], 80, 18)); tr.appendChild(h);
      table.appendChild(tr);
    });
    document.getElementById('count').textContent = ' ' + order.length + ' of ' + n + ' latents' +
      (order.length > PAGE ? ', showing ' + (from + 1) + '\u2013' + to : '');
    pager.textContent = '';
    if (state.page > 0) { var p = el('button', 'previous'); p.onclick = function () { state.page--; rows(); }; pager.appendChild(p); }
    if (to < order.length) { var nx = el('button', 'next'); nx.onclick = function () { state.page++; rows(); }; pager.appendChild(nx); }
  }
  q.oninput = function () { state.q = q.value; state.page = 0; rows(); };
  rows();
}

function context(ex, mx) {
  var d = el('div', '', 'ctx'); d.appendChild(el('span', fmt(ex.v), 'val'));
  ex.t.forEach(function (t, j) {
    var v = ex.a[j], s = el('span', showTok(t), 'tok' + (j === ex.c ? ' center' : ''));
    var alpha = v === null || !(mx > 0) ? 0 : Math.max(0, Math.min(1, v / mx));
    s.style.backgroundColor = 'rgba(230,110,20,' + alpha.toFixed(3) + ')';
    s.dataset.v = v === null ? '' : String(v); s.title = (v === null ? '-' : String(v)) + '  ' + JSON.stringify(tok(t));
    d.appendChild(s);
  });
  return d;
}

function showLatent(k, f, meta) {
  var info = meta.saes[k];
  if (!(f >= 0 && f < info.d_sae)) { fail('latent ' + f + ' is out of range: ' + info.name + ' has latents 0 to ' + (info.d_sae - 1)); return; }
  load('s' + k + '/c' + Math.floor(f / meta.chunk), function (recs) {
    var r = recs[f % meta.chunk], view = document.getElementById('view'); view.textContent = '';
    var back = el('a', '\u2190 all latents'); back.href = '#sae=' + k; view.appendChild(back);
    var h = el('h2', 'Latent ' + f); h.id = 'title'; view.appendChild(h);
    view.appendChild(el('div', 'density ' + fmt(r.density) + ' (' + r.fires + ' of ' + info.rows + ' rows) \u00b7 mean ' +
      fmt(r.mean) + ' when firing \u00b7 max ' + fmt(r.max), 'muted'));
    var grid = el('div', '', 'grid'); view.appendChild(grid);
    var c1 = el('div'); c1.appendChild(el('h3', 'Activations when firing (log bins)'));
    var e = meta.edges, lab = function (b) { return (b === 0 ? '0' : fmt(e[b - 1])) + ' to ' + (b - 1 >= e.length - 1 ? 'inf' : fmt(e[b])); };
    c1.appendChild(svgHist(r.hist.counts, 300, 90, r.hist.counts.map(function (c, j) { return lab(r.hist.lo + j) + ': ' + c; })));
    if (r.hist.counts.length) c1.appendChild(el('div', 'from ' + lab(r.hist.lo).split(' to ')[0] + ' to ' +
      lab(r.hist.lo + r.hist.counts.length - 1).split(' to ')[1] + ', 10 bins per decade', 'muted'));
    grid.appendChild(c1);
    var c2 = el('div'); c2.appendChild(el('h3', 'Logit effects'));
    if (r.pos) {
      var t = el('table'); t.id = 'logits';
      for (var j = 0; j < r.pos.length; j++) { var tr = el('tr');
        tr.appendChild(el('td', showTok(r.pos[j][0]), 'tok pos')); tr.appendChild(el('td', fmt(r.pos[j][1]), 'num pos'));
        tr.appendChild(el('td', showTok(r.neg[j][0]), 'tok neg')); tr.appendChild(el('td', fmt(r.neg[j][1]), 'num neg'));
        t.appendChild(tr); }
      c2.appendChild(t);
    } else c2.appendChild(el('div', 'not available at this site', 'muted'));
    grid.appendChild(c2);
    var c3 = el('div'); c3.appendChild(el('h3', 'Nearest latents (decoder cosine)'));
    r.nb.forEach(function (n) { var a = el('a', 'latent ' + n[0]); a.href = '#sae=' + k + '&latent=' + n[0];
      var d = el('div'); d.appendChild(a); d.appendChild(el('span', '  ' + fmt(n[1]), 'muted')); c3.appendChild(d); });
    grid.appendChild(c3);
    view.appendChild(el('h3', 'Top activations'));
    var top = el('div'); top.id = 'top'; r.top.forEach(function (ex) { top.appendChild(context(ex, r.max)); });
    if (!r.top.length) top.appendChild(el('div', 'never fires on these rows', 'muted'));
    view.appendChild(top);
    r.bands.slice().reverse().forEach(function (b) {
      view.appendChild(el('h3', 'Interval ' + fmt(b.lo) + ' to ' + fmt(b.hi) + ' (' + b.count + ' rows)'));
      b.ex.forEach(function (ex) { view.appendChild(context(ex, r.max)); });
    });
    document.title = info.name + ' latent ' + f;
  });
}

function render() {
  fail('');
  var meta = FB.cache.saes, h = route(), k = h.sae === undefined ? 0 : Number(h.sae);
  var sel = document.getElementById('sae');
  if (!sel.options.length) {
    meta.saes.forEach(function (s, i) { var o = el('option', s.name + ' (' + s.site + ', ' + s.d_sae + ')'); o.value = i; sel.appendChild(o); });
    sel.onchange = function () { state.page = 0; state.q = ''; go(sel.value); };
    sel.style.display = meta.saes.length > 1 ? '' : 'none';
  }
  if (!(Number.isInteger(k) && k >= 0 && k < meta.saes.length)) { fail('no SAE number ' + h.sae + ' in this browser'); return; }
  sel.value = String(k);
  var s = meta.saes[k];
  document.getElementById('saeinfo').textContent = s.name + ' \u00b7 ' + s.site + ' \u00b7 ' + s.arch + ' \u00b7 ' + s.rows + ' rows';
  if (h.latent !== undefined) showLatent(k, h.latent === '' ? NaN : Number(h.latent), meta);
  else load('s' + k + '/index', function (ix) { showIndex(k, ix); });
}
window.addEventListener('hashchange', render);
window.addEventListener('DOMContentLoaded', render);
"""
