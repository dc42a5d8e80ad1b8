/* Charts drawn by the page itself, as inline SVG (no library, nothing fetched): an event's
   requests, tokens and cost per hour, stacked by model; its models and its top attendees. */
(() => {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  // Told apart by lightness as well as hue; each model keeps its colour in every chart of the page.
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"];

  function svg(width, height, label) {
    const root = document.createElementNS(NS, "svg");
    root.setAttribute("viewBox", `0 0 ${width} ${height}`);
    root.setAttribute("class", "chart");
    root.setAttribute("role", "img");
    root.setAttribute("aria-label", label);
    return root;
  }

  function add(root, tag, attrs, text) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    root.append(node);
    return node;
  }

  function colours(models) {
    const map = {};
    models.forEach((model, i) => { map[model] = PALETTE[i % PALETTE.length]; });
    return map;
  }

  /** Columns per hour, each stacked by model: ``rows`` as in ``usage?by=hour``; ``figure`` one of its fields. */
  function hourly(rows, figure, title, format, colourOf, width) {
    const height = 120, left = 4, bottom = 18, top = 16;
    const root = svg(width, height, `${title} per hour`);
    add(root, "text", { x: left, y: 11, class: "title" }, title);
    const max = Math.max(0, ...rows.map((row) => row[figure]));
    const total = rows.reduce((sum, row) => sum + row[figure], 0);
    add(root, "text", { x: width - 4, y: 11, "text-anchor": "end" },
      max ? `${format(total)} in all, at most ${format(max)} an hour` : "none yet");
    const room = (width - left) / Math.max(1, rows.length);
    const bar = Math.max(1, room * 0.8);
    rows.forEach((row, i) => {
      const x = left + i * room;
      let y = height - bottom;
      for (const [model, figures] of Object.entries(row.models || {})) {
        const h = max ? (figures[figure] / max) * (height - bottom - top) : 0;
        if (h <= 0) continue;
        y -= h;
        const rect = add(root, "rect", { x, y, width: bar, height: h, fill: colourOf[model] || PALETTE[0] });
        add(rect, "title", {}, `${row.key} ${model}: ${format(figures[figure])}`);
      }
    });
    add(root, "line", { x1: left, x2: width, y1: height - bottom + 0.5, y2: height - bottom + 0.5 });
    // Hour labels where they fit: every nth column.
    const every = Math.max(1, Math.ceil(42 / room));
    rows.forEach((row, i) => {
      if (i % every) return;
      add(root, "text", { x: left + i * room, y: height - 4 }, row.key.slice(11, 16));
    });
    return root;
  }

  /** Horizontal bars: ``rows`` of {key, value, label}; the longest is the largest value. */
  function bars(rows, title, width, colourOf) {
    const band = 22, label = Math.round(width * 0.32), top = 18;
    const root = svg(width, top + Math.max(1, rows.length) * band + 4, title);
    add(root, "text", { x: 0, y: 11, class: "title" }, title);
    const max = Math.max(0, ...rows.map((row) => row.value));
    const room = width - label - 140;
    rows.forEach((row, i) => {
      const y = top + i * band;
      const chars = Math.floor(label / 7);
      add(root, "text", { x: 0, y: y + 13 }, row.key.length > chars ? row.key.slice(0, chars - 1) + "…" : row.key);
      const w = max ? Math.max(1, (row.value / max) * room) : 1;
      add(root, "rect", { x: label, y: y + 3, width: w, height: 13, fill: (colourOf && colourOf[row.key]) || PALETTE[0] });
      add(root, "text", { x: label + w + 4, y: y + 13 }, row.label);
    });
    return root;
  }

  function legend(colourOf) {
    const box = document.createElement("div");
    box.className = "legend";
    for (const [model, colour] of Object.entries(colourOf)) {
      const item = document.createElement("span");
      const swatch = document.createElementNS(NS, "svg");
      swatch.setAttribute("viewBox", "0 0 10 10");
      swatch.setAttribute("class", "swatch");
      swatch.setAttribute("aria-hidden", "true");
      add(swatch, "rect", { width: 10, height: 10, fill: colour });
      item.append(swatch, " " + model);
      box.append(item);
    }
    return box;
  }

  window.Charts = { hourly, bars, legend, colours };
})();
