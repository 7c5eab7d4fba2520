// Refresh the fleet table's rows without reloading the page: fetch the same
// query's rows as an HTML fragment (server-rendered) every 5 seconds.
(function () {
  "use strict";
  var table = document.getElementById("fleet");
  if (!table) { return; }
  var body = document.getElementById("fleet-rows");
  var stamp = document.getElementById("refreshed");
  function refresh() {
    fetch(table.dataset.refresh + window.location.search, { credentials: "same-origin" })
      .then(function (r) {
        if (r.status === 401) { window.location.href = "/login"; return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html === null) { return; }
        body.innerHTML = html;
        stamp.textContent = "live · updated " + new Date().toLocaleTimeString();
      })
      .catch(function () { stamp.textContent = "live · connection lost, retrying"; });
  }
  setInterval(refresh, 5000);
})();
