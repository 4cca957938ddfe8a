// Live pages: every element with data-live is refreshed from its fragment URL every 2 s (no page reload).
(function () {
  const boxes = document.querySelectorAll("[data-live]");
  async function refresh(box) {
    try {
      const reply = await fetch(box.dataset.live, {credentials: "same-origin", cache: "no-store"});
      if (reply.status === 401) { window.location = "/login"; return; }
      if (reply.ok) { box.innerHTML = await reply.text(); box.dataset.updated = String(Date.now()); }
      else {  // said on the page, not left at "loading..." (the full page of this URL says why)
        box.dataset.error = String(reply.status);
        box.textContent = "this part could not be read (HTTP " + reply.status + "): open " + box.dataset.live +
          " to see why";
      }
    } catch (e) { /* the console is restarting: try again at the next tick */ }
  }
  boxes.forEach(function (box) { refresh(box); setInterval(function () { refresh(box); }, 2000); });
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.dataset.confirm)) { event.preventDefault(); }
    });
  });
})();
