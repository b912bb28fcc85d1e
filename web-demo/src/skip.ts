// "Skip to content" moves the focus to the page's content. A plain `href="#main"` would not:
// the pages are routed by the hash, so following it would leave the page instead.
const skip = document.querySelector<HTMLAnchorElement>("a.skip");
skip?.addEventListener("click", (event) => {
  event.preventDefault();
  const main = document.getElementById("main");
  main?.focus();
  main?.scrollIntoView();
});
