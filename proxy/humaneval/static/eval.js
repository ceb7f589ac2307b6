// Keyboard shortcuts on the comparison page: 1 / 2 / 3 choose "A is better" / "Tie" / "B is better",
// Enter submits the choice. Without this file the page works the same by mouse, touch or Tab: the
// three choices are plain submit buttons.
(function () {
  "use strict";
  var form = document.getElementById("vote");
  if (!form || form.hasAttribute("data-voted")) return;
  var hint = document.getElementById("hint");
  var buttons = {};
  Array.prototype.forEach.call(form.querySelectorAll("button[data-key]"), function (b) {
    buttons[b.getAttribute("data-key")] = b;
  });
  var chosen = form.querySelector("button.chosen");  // kept by a form sent back with an error
  var sent = false;

  function within(el, selector) {
    return Boolean(el && el.closest && el.closest(selector));
  }
  // Digits are text in a text box; Enter also activates a focused link or button by itself.
  var TYPING = "textarea, input[type=text], select";
  var ACTIVATING = TYPING + ", a, button";

  document.addEventListener("keydown", function (e) {
    if (e.altKey || e.ctrlKey || e.metaKey || e.isComposing) return;
    if (buttons[e.key] && !within(e.target, TYPING)) {
      chosen = buttons[e.key];
      Object.keys(buttons).forEach(function (k) { buttons[k].classList.toggle("chosen", buttons[k] === chosen); });
      hint.textContent = "Chosen: " + chosen.textContent.replace(/\s*\d\s*$/, "") + ". Press Enter to submit.";
      e.preventDefault();
    } else if (e.key === "Enter" && !within(e.target, ACTIVATING)) {
      e.preventDefault();
      if (chosen) form.requestSubmit(chosen);
      else hint.textContent = "Choose first: 1 for A, 2 for a tie, 3 for B.";
    }
  });

  // One submission per page: the server ignores a second vote anyway, this spares the request.
  form.addEventListener("submit", function (e) {
    if (sent) e.preventDefault();
    sent = true;
  });
})();
