// Small behaviours shared by every page: auto-submitting selects, copy buttons, and focus
// on a form's error summary.
"use strict";
(function () {
  // Quota meters: the width from data-percent (the Content-Security-Policy allows no
  // inline style attribute; styles set from a script are allowed).
  document.querySelectorAll(".meter > span[data-percent]").forEach(function (bar) {
    bar.style.width = Math.min(100, Math.max(0, Number(bar.dataset.percent) || 0)) + "%";
  });
  document.querySelectorAll("form[data-autosubmit] select").forEach(function (select) {
    select.addEventListener("change", function () { select.form.submit(); });
  });

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    // Plain-HTTP pages (a LAN demo) have no clipboard API: fall back to a selection copy.
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); } finally { document.body.removeChild(area); }
    return Promise.resolve();
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (!button) return;
    var source = document.querySelector(button.getAttribute("data-copy"));
    if (!source) return;
    var label = button.textContent;
    copyText(source.textContent.trim()).then(function () {
      button.textContent = button.getAttribute("data-copied-text") || "Copied";
      setTimeout(function () { button.textContent = label; }, 1500);
    });
  });
  window.dashboardCopyText = copyText;

  // Times in the viewer's own time zone: the page says UTC (its text without JavaScript);
  // the instant is in each <time datetime>, the UTC text stays in its title.
  var zone = "";
  try { zone = Intl.DateTimeFormat().resolvedOptions().timeZone || ""; } catch (e) { zone = ""; }
  function pad(n) { return (n < 10 ? "0" : "") + n; }
  document.querySelectorAll("time[data-local-time]").forEach(function (el) {
    var when = new Date(el.getAttribute("datetime"));
    if (isNaN(when.getTime())) return;
    var text = when.getFullYear() + "-" + pad(when.getMonth() + 1) + "-" + pad(when.getDate()) +
      " " + pad(when.getHours()) + ":" + pad(when.getMinutes());
    if (el.getAttribute("data-local-time") === "seconds") text += ":" + pad(when.getSeconds());
    el.title = el.textContent + (zone ? " · " + zone : "");
    el.textContent = text;
    el.setAttribute("data-zone", zone);
  });

  // After a failed submit, move focus to the summary of the errors (role="alert" announces
  // it), so keyboard and screen-reader users land on what to fix.
  var summary = document.querySelector("[data-error-summary]");
  if (summary) summary.focus();
})();
