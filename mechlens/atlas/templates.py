"""Jinja2 templates of the atlas (autoescaped: labels and concept names are user text)."""
from __future__ import annotations

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#20232a;color:#fff;padding:14px 24px}header a{color:#9cdcfe}
main{padding:16px 24px;max-width:1400px}
table{border-collapse:collapse;width:100%;font-size:13px;background:#fff}
th,td{border-bottom:1px solid #e3e3e3;padding:4px 8px;text-align:left;vertical-align:middle}
th{cursor:pointer;user-select:none;background:#f0f0f0;position:sticky;top:0}
th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
img.thumb{height:40px;image-rendering:pixelated}
.cards{display:flex;flex-wrap:wrap;gap:18px}.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px}
.card h3{margin:0 0 6px 0;font-size:14px}
.bar{fill:#4a7bd0}.hist text{font-size:9px;fill:#555}
input#filter{font-size:14px;padding:4px 8px;width:320px;margin:8px 0}
.meta td{border:none;padding:2px 10px 2px 0}
svg.map circle{fill:#4a7bd0;fill-opacity:.7}svg.map a:hover circle{fill:#e0552f !important;fill-opacity:1 !important}
.pill{display:inline-block;background:#eef;border-radius:10px;padding:1px 8px;margin:1px;font-size:12px}
.up{color:#19733a}.down{color:#a12a2a}
.badge{display:inline-block;background:#a12a2a;color:#fff;border-radius:4px;padding:0 6px;font-size:12px;font-weight:bold}
.badge.flag{background:#b35c00}
p.disagree{background:#fdecea;border-left:4px solid #a12a2a;padding:4px 8px}tr.disagree td{background:#fdecea}
table.causal,table.nodes{width:auto}table.causal th,table.nodes th{cursor:default;position:static}
svg a:hover rect{stroke:#e0552f;stroke-width:2}
"""

SORT_JS = """
(function(){
  var table=document.getElementById('features');
  var body=table.tBodies[0];
  var rows=Array.prototype.slice.call(body.rows);
  var state={col:-1,dir:1};
  function key(row,col){var c=row.cells[col];var v=c.getAttribute('data-value');
    if(v===null){v=c.textContent.trim();}var n=parseFloat(v);return isNaN(n)?v.toLowerCase():n;}
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,col){
    th.addEventListener('click',function(){
      state.dir=(state.col===col)?-state.dir:(th.getAttribute('data-type')==='num'?-1:1);state.col=col;
      rows.sort(function(a,b){var x=key(a,col),y=key(b,col);return x<y?-state.dir:x>y?state.dir:0;});
      rows.forEach(function(r){body.appendChild(r);});
      Array.prototype.forEach.call(table.tHead.rows[0].cells,function(h){h.classList.remove('sorted-asc','sorted-desc');});
      th.classList.add(state.dir>0?'sorted-asc':'sorted-desc');
      if(typeof render==='function'){render();}
    });
  });
  var colour=document.getElementById('mapcolour');
  if(colour){colour.addEventListener('change',function(){var key=colour.value==='density'?'data-density-fill':'data-class-fill';
    Array.prototype.forEach.call(document.querySelectorAll('svg.map circle[data-class-fill]'),function(c){c.style.fill=c.getAttribute(key);});});}
  var filter=document.getElementById('filter');
  var more=document.getElementById('more');
  var PAGE=500, all=false;  // a 16k-feature index stays fast: the first rows, the rest on request
  function render(){var q=filter.value.toLowerCase();var shown=0,visible=0;
    rows.forEach(function(r){var hit=r.textContent.toLowerCase().indexOf(q)>=0;if(hit)shown++;
      var show=hit&&(all||visible<PAGE);if(show)visible++;r.style.display=show?'':'none';});
    document.getElementById('shown').textContent=shown;
    if(more){more.style.display=shown>visible?'':'none';more.textContent='show all '+shown+' (first '+visible+' shown)';}}
  filter.addEventListener('input',render);
  if(more){more.addEventListener('click',function(){all=true;render();});}
  render();
})();
"""

INDEX = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<link rel="stylesheet" href="static/atlas.css"></head>
<body><header><h1 style="margin:0;font-size:20px">{{ title }}</h1>
<div>{{ subtitle }}</div></header>
<main>
<table class="meta">{% for k, v in summary %}<tr><td><b>{{ k }}</b></td><td>{{ v }}</td></tr>{% endfor %}</table>
{% if circuit %}<h2>Circuit</h2>
<p><a id="circuit-link" href="{{ circuit.page }}">The circuit for {{ circuit.target }}</a>: {{ circuit.nodes | length }} nodes over
{{ circuit.layers | join(', ') }}, faithfulness {{ '%.3f' % circuit.faithfulness }}, completeness {{ '%.3f' % circuit.completeness }}.</p>{% endif %}
<h2>Overview map</h2>
<p>Features laid out by {{ map_method }} of their decoder directions; click a point to open the feature. Colour:
<select id="mapcolour"><option value="class">top class</option><option value="density">firing frequency (dark: rare)</option></select></p>
{{ map_svg | safe }}
<h2>Features (<span id="shown">{{ features | length }}</span> shown)</h2>
<input id="filter" type="search" placeholder="filter: class, concept, id ...">
<table id="features"><thead><tr>
<th data-type="num">feature</th><th>exemplars</th><th data-type="num">frequency</th><th data-type="num">mean (active)</th>
<th data-type="num">max</th><th>top classes</th><th>pushes up</th><th>best concept</th><th data-type="num">concept cos</th>
</tr></thead><tbody>
{% for f in features %}<tr id="f{{ f.id }}">
<td class="num" data-value="{{ f.id }}"><a href="features/{{ f.id }}.html">#{{ f.id }}</a>{% if f.flag %}
<span class="badge flag" title="flagged by the report">{{ f.flag }}</span>{% endif %}{% if f.causal and f.causal.disagrees %}
<span class="badge" title="its linear logit estimate and its measured ablation effect disagree">disagree</span>{% endif %}</td>
<td><a href="features/{{ f.id }}.html"><img class="thumb" loading="lazy" src="img/{{ f.id }}-exemplars.png" alt="exemplars of feature {{ f.id }}"></a></td>
<td class="num" data-value="{{ f.frequency }}">{{ '%.4f' % f.frequency }}</td>
<td class="num" data-value="{{ f.mean_active }}">{{ '%.3g' % f.mean_active }}</td>
<td class="num" data-value="{{ f.max }}">{{ '%.3g' % f.max }}</td>
<td>{% for c in f.top_classes %}<span class="pill">{{ c.name }} {{ '%.0f' % (100 * c.share) }}%</span>{% endfor %}</td>
<td>{% for c in f.logit_up %}<span class="pill up">{{ c.name }}</span>{% endfor %}</td>
<td>{{ f.concept or '' }}</td>
<td class="num" data-value="{{ f.concept_cos if f.concept_cos is not none else -2 }}">{{ '%.2f' % f.concept_cos if f.concept_cos is not none else '' }}</td>
</tr>{% endfor %}
</tbody></table>
<p><button id="more" type="button" style="display:none"></button></p>
</main>
<script src="static/atlas.js"></script>
</body></html>
"""

FEATURE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Feature {{ f.id }} - {{ title }}</title>
<link rel="stylesheet" href="../static/atlas.css"></head>
<body><header><a href="../index.html">&larr; atlas</a>
{% if prev_id is not none %} &middot; <a href="{{ prev_id }}.html">&larr; #{{ prev_id }}</a>{% endif %}
{% if next_id is not none %} &middot; <a href="{{ next_id }}.html">#{{ next_id }} &rarr;</a>{% endif %}
<h1 style="margin:4px 0 0 0;font-size:20px">Feature #{{ f.id }} <small>({{ layer }}; {{ f.spec }})</small>
{% if f.flag %}<span class="badge flag">{{ f.flag }}</span>{% endif %}</h1></header>
<main>
<table class="meta">
<tr><td><b>firing frequency</b></td><td>{{ '%.5f' % f.frequency }} of {{ rows }} rows</td></tr>
<tr><td><b>mean activation</b></td><td>{{ '%.4g' % f.mean }} (when active {{ '%.4g' % f.mean_active }})</td></tr>
<tr><td><b>max activation</b></td><td>{{ '%.4g' % f.max }}</td></tr>
</table>
{{ body }}
</main></body></html>
"""

CIRCUIT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Circuit for {{ target }} - {{ title }}</title>
<link rel="stylesheet" href="static/atlas.css"></head>
<body><header><a href="index.html">&larr; atlas</a>
<h1 style="margin:4px 0 0 0;font-size:20px">Circuit for {{ target }}</h1></header>
<main>
<table class="meta">
<tr><td><b>faithfulness</b></td><td>{{ '%.3f' % circuit.faithfulness }} (the target with only the circuit's nodes kept, every other latent mean-ablated, relative to the model)</td></tr>
<tr><td><b>completeness</b></td><td>{{ '%.3f' % circuit.completeness }} (the same with the circuit's own nodes ablated: near 0 when it holds it all)</td></tr>
<tr><td><b>nodes</b></td><td>{{ nodes | length }} over {{ circuit.layers | join(', ') }}; {{ circuit.edges | length }} edges; {{ circuit.images }} images</td></tr>
<tr><td><b>in this atlas</b></td><td>{{ published }} node(s) link to their feature page</td></tr>
</table>
<p>Layers bottom to top, the target on top; edge width is the edge's weight (blue: the source holds its destination up,
so ablating it lowers the destination; red: it holds it down). A node's number is its effect on the target when
mean-ablated (negative: the node supports the target).</p>
<div class="card" style="overflow:auto">{{ svg }}</div>
<h2>Nodes</h2>
<table class="nodes"><thead><tr><th>layer</th><th>latent</th><th>effect</th><th></th></tr></thead><tbody>
{% for n in nodes %}<tr><td>{{ n.layer }}</td><td>{% if n.page %}<a href="{{ n.page }}">{{ n.label }}</a>{% else %}{{ n.label }}{% endif %}</td>
<td class="num">{{ '%+.4g' % n.effect }}</td>
<td>{% if n.thumbnail %}<img class="thumb" src="{{ n.thumbnail }}" alt="{{ n.name }}">{% endif %}</td></tr>{% endfor %}
</tbody></table>
</main></body></html>
"""
