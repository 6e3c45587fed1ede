// The dashboard: draw the tasks-per-minute chart as inline SVG, then fetch the page's data
// every few seconds and redraw the workers, the queues and the chart from it.
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const WIDTH = 760;
  const HEIGHT = 220;
  const LEFT = 44;   // room for the counts on the left
  const BOTTOM = 22; // room for the times below
  const TOP = 8;

  function ago(seconds) {
    if (seconds < 120) {
      return Math.round(seconds) + " s ago";
    }
    if (seconds < 2 * 3600) {
      return Math.floor(seconds / 60) + " min ago";
    }
    return Math.floor(seconds / 3600) + " h ago";
  }

  function twoDigits(number) {
    return String(number).padStart(2, "0");
  }

  function hhmm(iso) {
    const when = new Date(iso);
    return twoDigits(when.getHours()) + ":" + twoDigits(when.getMinutes());
  }

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) {
      td.className = className;
    }
    row.appendChild(td);
    return td;
  }

  function svg(name, attributes, parent) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) {
      node.setAttribute(key, value);
    }
    if (parent) {
      parent.appendChild(node);
    }
    return node;
  }

  // The smallest of 1, 2, 5, 10, 20, 50… at or above `value`: the top of the scale.
  function scaleTop(value) {
    let step = 1;
    while (true) {
      for (const factor of [1, 2, 5]) {
        if (step * factor >= value) {
          return step * factor;
        }
      }
      step *= 10;
    }
  }

  function drawChart(box, minutes) {
    const top = scaleTop(Math.max(1, ...minutes.map(function (m) { return m.processed; })));
    const plotWidth = WIDTH - LEFT;
    const plotHeight = HEIGHT - TOP - BOTTOM;
    const slot = plotWidth / minutes.length;
    const chart = svg("svg", {viewBox: "0 0 " + WIDTH + " " + HEIGHT, role: "img",
                              class: "dtq-svg", "aria-label": "Tasks per minute, last hour"});
    for (const fraction of [0, 0.5, 1]) {
      const y = TOP + plotHeight * (1 - fraction);
      svg("line", {x1: LEFT, x2: WIDTH, y1: y, y2: y, class: "dtq-grid"}, chart);
      const label = svg("text", {x: LEFT - 6, y: y + 4, class: "dtq-axis", "text-anchor": "end"},
                        chart);
      label.textContent = String(Math.round(top * fraction));
    }
    minutes.forEach(function (m, i) {
      const x = LEFT + i * slot + 1;
      const lastOne = i === minutes.length - 1;
      if (i % 10 === 0 || lastOne) {
        const label = svg("text", {x: lastOne ? WIDTH : x + slot / 2, y: HEIGHT - 6,
                                   class: "dtq-axis", "text-anchor": lastOne ? "end" : "middle"},
                          chart);
        label.textContent = hhmm(m.minute);
      }
      if (!m.processed) {
        return;
      }
      const group = svg("g", {class: "dtq-minute", "data-minute": m.minute}, chart);
      const title = svg("title", {}, group);
      title.textContent = hhmm(m.minute) + ": " + m.processed + " processed, " + m.failed +
        " failed";
      const height = plotHeight * m.processed / top;
      svg("rect", {x: x, width: Math.max(1, slot - 2), y: TOP + plotHeight - height,
                   height: height, class: "dtq-bar-processed"}, group);
      if (m.failed) {
        const failed = plotHeight * m.failed / top;
        svg("rect", {x: x, width: Math.max(1, slot - 2), y: TOP + plotHeight - failed,
                     height: failed, class: "dtq-bar-failed"}, group);
      }
    });
    box.replaceChildren(chart);
  }

  function drawWorkers(table, workers) {
    const body = document.createElement("tbody");
    for (const w of workers) {
      const row = document.createElement("tr");
      row.dataset.hostname = w.hostname;
      row.className = w.online ? "dtq-online" : "dtq-offline";
      cell(row, w.hostname, "dtq-hostname");
      cell(row, String(w.pid), "dtq-pid");
      cell(row, w.pool, "dtq-pool");
      cell(row, String(w.concurrency), "dtq-num dtq-concurrency");
      cell(row, String(w.active), "dtq-num dtq-active");
      cell(row, String(w.processed), "dtq-num dtq-processed");
      cell(row, String(w.failed), "dtq-num dtq-failed");
      cell(row, w.queues.join(", "), "dtq-queues");
      cell(row, ago(w.seen_ago), "dtq-seen").title = w.last_heartbeat;
      cell(row, w.online ? "online" : "offline", "dtq-status");
      body.appendChild(row);
    }
    if (!workers.length) {
      const row = document.createElement("tr");
      row.className = "dtq-empty";
      const td = cell(row, "No worker has reported yet: start one with ");
      td.colSpan = 10;
      const code = document.createElement("code");
      code.textContent = "manage.py taskworker";
      td.append(code, ".");
      body.appendChild(row);
    }
    table.tBodies[0].replaceWith(body);
  }

  function drawQueues(table, queues) {
    document.getElementById("dtq-broker").textContent = queues.broker;
    const error = document.getElementById("dtq-broker-error");
    error.hidden = !queues.error;
    error.textContent = queues.error ?
      "The broker cannot be reached, so queue lengths are unknown: " + queues.error : "";
    const body = document.createElement("tbody");
    for (const q of queues.sizes) {
      const row = document.createElement("tr");
      row.dataset.queue = q.name;
      cell(row, q.name, "dtq-queue");
      cell(row, q.size === null ? "not declared" : String(q.size), "dtq-num dtq-size");
      cell(row, String(q.consumers),
           "dtq-num dtq-consumers" + (q.consumers ? "" : " dtq-warning"));
      body.appendChild(row);
    }
    table.tBodies[0].replaceWith(body);
  }

  function draw(data) {
    drawWorkers(document.getElementById("dtq-workers"), data.workers);
    drawQueues(document.getElementById("dtq-queues"), data.queues);
    drawChart(document.getElementById("dtq-chart"), data.minutes);
    let processed = 0;
    let failed = 0;
    for (const m of data.minutes) {
      processed += m.processed;
      failed += m.failed;
    }
    document.getElementById("dtq-totals").textContent =
      processed + " processed, " + failed + " failed";
  }

  document.addEventListener("DOMContentLoaded", function () {
    const root = document.getElementById("dtq-dashboard");
    const initial = document.getElementById("dtq-dashboard-data");
    if (!root || !initial) {
      return;
    }
    const problem = document.getElementById("dtq-refresh-error");
    const updated = document.getElementById("dtq-updated");
    const every = 1000 * (parseFloat(root.dataset.refresh) || 5);
    draw(JSON.parse(initial.textContent));

    function refresh() {
      if (document.hidden) { // nobody looks: ask again later
        window.setTimeout(refresh, every);
        return;
      }
      fetch(root.dataset.url, {credentials: "same-origin", headers: {Accept: "application/json"}})
        .then(function (response) {
          if (response.redirected) { // to the login page
            throw new Error("the session has ended; reload the page to log in again");
          }
          if (!response.ok) {
            throw new Error("the server answered " + response.status + " " +
                            response.statusText + "; reload the page to try again");
          }
          return response.json();
        })
        .then(function (data) {
          draw(data);
          const now = new Date();
          updated.textContent = "Updated " + twoDigits(now.getHours()) + ":" +
            twoDigits(now.getMinutes()) + ":" + twoDigits(now.getSeconds());
          problem.hidden = true;
        })
        .catch(function (error) {
          problem.textContent = "Could not refresh: " + error.message;
          problem.hidden = false;
        })
        .finally(function () { window.setTimeout(refresh, every); });
    }
    window.setTimeout(refresh, every);
  });
})();
