// celery_dbsched dashboard: live active runs. Written for this package (MIT, like it); no library, no CDN.
// Every table with data-live="<url>" is refreshed from that JSON (/api/runs/active) every second: progress
// bars move, new runs appear, ended ones go. Text is set with textContent only (never HTML).
"use strict";
(function () {
  var PERIOD_MS = 1000;

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function when(iso) {
    return iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace("+00:00", "") : "-";
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    if (seconds < 10) return (Math.round(seconds * 10) / 10) + " s";
    var whole = Math.floor(seconds);
    var units = [[86400, "d", 3600, "h"], [3600, "h", 60, "min"], [60, "min", 1, "s"]];
    for (var i = 0; i < units.length; i++) {
      var u = units[i];
      if (whole >= u[0]) {
        var rest = Math.floor((whole % u[0]) / u[2]);
        return Math.floor(whole / u[0]) + " " + u[1] + (rest ? " " + rest + " " + u[3] : "");
      }
    }
    return whole + " s";
  }

  function cancelForm(run) {
    var form = el("form", "cancel-form inline");
    form.method = "post";
    form.action = "/api/runs/" + encodeURIComponent(run.id) + "/cancel";
    var csrf = el("input");
    csrf.type = "hidden"; csrf.name = "csrf"; csrf.value = document.body.getAttribute("data-csrf") || "";
    var back = el("input");
    back.type = "hidden"; back.name = "next"; back.value = location.pathname + location.search;
    var button = el("button", "cancel", "Cancel");
    button.type = "submit";
    form.appendChild(csrf); form.appendChild(back); form.appendChild(button);
    return form;
  }

  function row(run, canAct) {
    var tr = el("tr", "run-row status-" + run.status);
    tr.setAttribute("data-run-id", run.id);
    tr.setAttribute("data-status", run.status);
    tr.appendChild(el("td", "run-id", run.id));
    var job = el("td", "run-job");
    var link = el("a", null, run.job);
    link.href = "/job?name=" + encodeURIComponent(run.job);
    job.appendChild(link);
    tr.appendChild(job);
    var status = el("td", "run-status");
    status.appendChild(el("span", "badge " + run.status, run.status));
    tr.appendChild(status);
    var progress = el("td", "run-progress");
    var bar = el("progress", "progress-bar");
    bar.max = run.progress.total || 1;
    bar.value = run.progress.completed;
    progress.appendChild(bar);
    progress.appendChild(el("span", "progress-text", run.progress.completed + "/" + run.progress.total));
    tr.appendChild(progress);
    tr.appendChild(el("td", "run-started", when(run.started)));
    tr.appendChild(el("td", "run-duration", duration(run.duration)));
    tr.appendChild(el("td", "run-worker", run.worker || "-"));
    var error = el("td", "run-error");
    if (canAct) error.appendChild(cancelForm(run));
    tr.appendChild(error);
    return tr;
  }

  function update(table, runs) {
    var body = table.querySelector("tbody");
    var canAct = table.getAttribute("data-can-act") === "true";
    var rows = {};
    Array.prototype.forEach.call(body.querySelectorAll("tr.run-row"), function (tr) {
      rows[tr.getAttribute("data-run-id")] = tr;
    });
    var seen = {};
    runs.forEach(function (run, index) {
      var key = String(run.id);
      seen[key] = true;
      var tr = rows[key];
      if (tr && tr.getAttribute("data-status") === run.status) {
        var bar = tr.querySelector("progress.progress-bar");
        bar.max = run.progress.total || 1;
        bar.value = run.progress.completed;
        tr.querySelector(".progress-text").textContent = run.progress.completed + "/" + run.progress.total;
        tr.querySelector(".run-duration").textContent = duration(run.duration);
      } else {
        var fresh = row(run, canAct);
        if (tr) body.replaceChild(fresh, tr); else body.insertBefore(fresh, body.children[index] || null);
      }
    });
    Object.keys(rows).forEach(function (key) {
      if (!seen[key]) body.removeChild(rows[key]);
    });
    var empty = document.getElementById("no-active");
    if (empty) empty.hidden = runs.length > 0;
  }

  function poll(table) {
    var url = table.getAttribute("data-live");
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (data) { if (data) update(table, data.runs); })
      .catch(function () { /* the next poll tries again */ })
      .then(function () { setTimeout(function () { poll(table); }, PERIOD_MS); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll("table[data-live]"), function (table) {
      setTimeout(function () { poll(table); }, PERIOD_MS);
    });
  });
})();
