// What every plotly figure on the page rendered, for tests/test_browser.py (page.evaluate).
// Colours are the computed SVG styles of the drawn elements, so they are what the reader sees;
// each drawn trace is matched to its legend entry through the trace plotly bound to it (d3's
// __data__), never through the figure's JSON.
() => {
  const style = (el, prop) => (el ? getComputedStyle(el)[prop] : null);
  const box = (el) => {
    const r = el.getBoundingClientRect();
    return { left: r.left, top: r.top, right: r.right, bottom: r.bottom };
  };
  // line / marker / fill colours of one drawn trace or legend swatch
  const colours = (g) => {
    const out = {};
    const line = g.querySelector("path.js-line");
    const point = g.querySelector("path.point, path.scatterpts");
    const boxPath = g.querySelector("path.box, path.legendbox");
    if (line) out.line = style(line, "stroke");
    if (point) out.marker = style(point, "fill");
    if (boxPath) {
      out.line = style(boxPath, "stroke");
      out.fill = style(boxPath, "fill");
    }
    return out;
  };
  const key = (trace) => trace.legendgroup || trace.name;
  return [...document.querySelectorAll(".js-plotly-plot")].map((gd) => {
    const layout = gd._fullLayout;
    const svg = box(gd.querySelector(".main-svg"));
    const legend = [...gd.querySelectorAll("g.legend g.traces")].map((g) => ({
      key: key(g.__data__[0].trace), name: g.__data__[0].trace.name, colours: colours(g),
    }));
    const drawn = [...gd.querySelectorAll(".cartesianlayer g.trace")].map((g) => {
      const t = g.__data__[0].trace;
      return { key: key(t), name: t.name, type: t.type, panel: t.xaxis, colours: colours(g) };
    });
    // labels: annotations (subplot titles, reference lines' labels, notes) and text points
    const labels = [...gd.querySelectorAll("g.annotation")].map((g) => {
      const bg = g.querySelector("rect.bg");
      return { text: g.textContent, rect: box(g.querySelector("text")), bg: bg ? box(bg) : null };
    });
    for (const t of gd.querySelectorAll(".cartesianlayer g.textpoint text")) {
      labels.push({ text: t.textContent, rect: box(t), bg: null });
    }
    return {
      title: (gd.layout.title && gd.layout.title.text) || (labels[0] ? labels[0].text : ""),
      panels: Object.keys(layout._plots).length,
      svg, legend, drawn, labels,
    };
  });
}
