// celery_dbsched dashboard: live active runs. Written for this package (MIT, like it); no library, no CDN.
// Every table with data-live="<url>" is refreshed from that JSON (/api/runs/active) every second: progress
// bars move, new runs appear, ended ones go. Text is set with textContent only (never HTML).
// The fleet page (table#fleet) polls /api/status every data-lag-poll seconds and keeps each beat's claim lag
// (p50 and max over the last minute, from its server row) as samples while it is open: the lines of each
// beat's svg.lag-line (p50 dark, max light, on the scale of the highest max) are drawn from the latest
// LAG_SAMPLES of them, across its width (nothing is stored).
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

  var LAG_SAMPLES = 120;
  var SVG = "http://www.w3.org/2000/svg";

  function number(text) {
    return text === null || text === undefined || text === "" ? null : Number(text);
  }

  function seconds(value) {
    return value === null || value === undefined ? "-" : value.toFixed(3) + " s";
  }

  function lagLine(svg, samples) {
    var width = Number(svg.getAttribute("width")), height = Number(svg.getAttribute("height"));
    var peak = null;
    samples.forEach(function (s) { if (s.max !== null) peak = Math.max(peak || 0, s.max); });
    var top = peak || 1;
    var step = width / Math.max(samples.length - 1, 1);  // the samples kept span the width
    var offset = width - step * (samples.length - 1);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    ["max", "p50"].forEach(function (key) {
      var points = [];
      samples.forEach(function (s, i) {
        if (s[key] === null) return;
        var x = offset + i * step, y = (height - 1 - (height - 2) * s[key] / top).toFixed(1);
        if (!points.length && i === samples.length - 1) points.push((x - step).toFixed(1) + "," + y);  // one: a tick
        points.push(x.toFixed(1) + "," + y);
      });
      var line = document.createElementNS(SVG, "polyline");
      line.setAttribute("class", "lag-" + key + "-line");
      line.setAttribute("points", points.join(" "));
      svg.appendChild(line);
    });
    var title = document.createElementNS(SVG, "title");
    title.textContent = "claim lag over the last " + samples.length + " samples: up to " + seconds(peak);
    svg.appendChild(title);
  }

  function fleetLag(table) {
    var period = 1000 * Number(table.getAttribute("data-lag-poll") || 5);
    var samples = {};
    Array.prototype.forEach.call(table.querySelectorAll("tr.server-row[data-role=beat]"), function (tr) {
      var svg = tr.querySelector("svg.lag-line");
      var id = tr.getAttribute("data-server-id");
      samples[id] = [{ p50: number(svg.getAttribute("data-p50")), max: number(svg.getAttribute("data-max")) }];
      lagLine(svg, samples[id]);
    });
    function rows() {
      var found = {};
      Array.prototype.forEach.call(table.querySelectorAll("tr.server-row[data-role=beat]"), function (tr) {
        found[tr.getAttribute("data-server-id")] = tr;
      });
      return found;
    }
    function poll() {
      fetch("/api/status", { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (data) {
          if (!data) return;
          var beats = rows();
          data.beats.forEach(function (beat) {
            var tr = beats[beat.id];
            if (!tr) return;  // a beat that started after the page loaded: shown at the next load
            var kept = samples[beat.id] = (samples[beat.id] || []).concat([{ p50: beat.claim_lag_p50, max: beat.claim_lag_max }]);
            if (kept.length > LAG_SAMPLES) kept.shift();
            tr.querySelector(".lag-p50").textContent = seconds(beat.claim_lag_p50);
            tr.querySelector(".lag-max").textContent = seconds(beat.claim_lag_max);
            lagLine(tr.querySelector("svg.lag-line"), kept);
          });
        })
        .catch(function () { /* the next poll tries again */ })
        .then(function () { setTimeout(poll, period); });
    }
    setTimeout(poll, period);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var fleet = document.querySelector("table#fleet[data-lag-poll]");
    if (fleet) fleetLag(fleet);
    Array.prototype.forEach.call(document.querySelectorAll("table[data-live]"), function (table) {
      setTimeout(function () { poll(table); }, PERIOD_MS);
    });
  });
})();
