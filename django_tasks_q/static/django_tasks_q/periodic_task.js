// The periodic task form: show the fields of the chosen schedule type only, and keep the
// schedule in words and its next runs up to date as those fields change.
"use strict";
(function () {
  const KINDS = ["crontab", "interval", "run_at"];

  function chosenKind(form) {
    const checked = form.querySelector('input[name="kind"]:checked');
    return checked ? checked.value : "crontab";
  }

  function showChosen(form) {
    const kind = chosenKind(form);
    for (const other of KINDS) {
      const row = form.querySelector(".field-" + other);
      if (row) {
        row.style.display = other === kind ? "" : "none";
      }
    }
  }

  function refresh(form, box) {
    const params = new URLSearchParams({kind: chosenKind(form)});
    for (const name of ["crontab", "interval", "run_at_0", "run_at_1", "timezone"]) {
      const field = form.querySelector('[name="' + name + '"]');
      if (field) {
        params.set(name, field.value);
      }
    }
    fetch(box.dataset.url + "?" + params.toString(), {credentials: "same-origin"})
      .then(function (response) { return response.json(); })
      .then(function (answer) {
        box.textContent = answer.text;
        box.dataset.ok = answer.ok ? "1" : "0";
      })
      .catch(function () { box.textContent = "(the preview is not available)"; });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const box = document.getElementById("dtq-preview");
    const form = box && box.closest("form");
    if (!form) {
      return;
    }
    let timer = null;
    const later = function () {
      showChosen(form);
      clearTimeout(timer);
      timer = setTimeout(function () { refresh(form, box); }, 250);
    };
    form.addEventListener("input", later);
    form.addEventListener("change", later);
    showChosen(form);
    refresh(form, box);
  });
})();
