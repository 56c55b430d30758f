// Airlock web UI: live queue over server-sent events, countdowns, and the deny-needs-a-reason
// hint. The pages work without it (the server checks everything); it only saves reloads.
"use strict";

function countdowns() {
  const now = Date.now();
  for (const el of document.querySelectorAll("time.countdown")) {
    const left = Math.max(0, Math.floor((Number(el.dataset.deadline) - now) / 1000));
    el.textContent = left > 0 ? `${Math.floor(left / 60)}m ${left % 60}s` : "expired";
  }
}

function setTitleCount(n) {
  const base = document.title.replace(/^\(\d+\) /, "");
  document.title = n > 0 ? `(${n}) ${base}` : base;
}

async function refreshQueue() {
  const body = document.getElementById("queue");
  if (!body) return;
  const r = await fetch("/fragments/queue", { credentials: "same-origin" });
  if (!r.ok) return;
  const tmp = document.createElement("table");
  tmp.innerHTML = await r.text();
  const fresh = tmp.querySelector("tbody");
  if (!fresh) return;
  body.replaceWith(fresh);
  setTitleCount(Number(fresh.dataset.count || 0));
  countdowns();
}

function live() {
  const request = document.querySelector("[data-request]");
  const events = new EventSource("/events");
  events.addEventListener("request", (e) => {
    const change = JSON.parse(e.data);
    if (document.getElementById("queue")) refreshQueue();
    if (request && change.id === request.dataset.request && change.state !== request.dataset.state) {
      const note = request.querySelector(".changed");
      if (note) note.hidden = false;
    }
  });
}

function denyNeedsReason() {
  const deny = document.getElementById("deny");
  const reason = document.getElementById("reason");
  if (!deny || !reason) return;
  deny.addEventListener("click", (e) => {
    if (reason.value.trim() === "") {
      e.preventDefault();
      reason.setCustomValidity("A deny needs a reason.");
      reason.reportValidity();
    }
  });
  reason.addEventListener("input", () => reason.setCustomValidity(""));
}

document.addEventListener("DOMContentLoaded", () => {
  countdowns();
  setInterval(countdowns, 1000);
  if (document.querySelector("header.top")) live();
  denyNeedsReason();
});
