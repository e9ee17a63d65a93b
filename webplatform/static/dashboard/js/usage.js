// Usage charts (Chart.js, served by the project from node_modules).
"use strict";
(function () {
  var data = JSON.parse(document.getElementById("usage-data").textContent);
  var t = data.i18n;
  var common = {
    responsive: true,
    maintainAspectRatio: false,
    animation: false,
    interaction: { mode: "index", intersect: false },
    scales: { y: { beginAtZero: true, ticks: { precision: 0 } }, x: { ticks: { maxTicksLimit: 8 } } },
    plugins: { legend: { position: "bottom" } },
  };
  function chart(id, type, datasets, options) {
    var canvas = document.getElementById(id);
    if (!canvas || !window.Chart) return null;
    return new window.Chart(canvas, {
      type: type,
      data: { labels: data.labels, datasets: datasets },
      options: Object.assign({}, common, options || {}),
    });
  }
  window.usageCharts = {
    requests: chart("chart-requests", "bar", [
      { label: t.requests, data: data.requests, backgroundColor: "#2456d3" },
      { label: t.errors, data: data.errors, backgroundColor: "#c62b2b" },
    ]),
    tokens: chart("chart-tokens", "bar", [
      { label: t.prompt_tokens, data: data.prompt_tokens, backgroundColor: "#6b8be0", stack: "tokens" },
      { label: t.completion_tokens, data: data.completion_tokens, backgroundColor: "#1c7c46", stack: "tokens" },
    ], { scales: { x: { stacked: true, ticks: { maxTicksLimit: 8 } }, y: { stacked: true, beginAtZero: true } } }),
    latency: chart("chart-latency", "line", [
      { label: t.p50, data: data.p50, borderColor: "#2456d3", backgroundColor: "#2456d3", spanGaps: true },
      { label: t.p95, data: data.p95, borderColor: "#a35b00", backgroundColor: "#a35b00", spanGaps: true },
    ]),
  };
})();
