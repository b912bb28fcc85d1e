import "./style.css";
import "./skip";
import { call, onSignedOut, signIn, signOut, token } from "./api";
import { cameraPage } from "./camera";
import { chatPage } from "./chat";
import { documentsPage } from "./documents";
import { h, status } from "./dom";
import { imagesPage } from "./images";
import { operationsPage } from "./operations";
import { usagePage } from "./usage";

const main = document.getElementById("main") as HTMLElement;
const who = document.getElementById("who") as HTMLElement;
const pages: Record<string, (root: HTMLElement) => void> = {
  chat: chatPage,
  documents: documentsPage,
  images: imagesPage,
  camera: cameraPage,
  usage: usagePage,
  operations: operationsPage,
};

function signInPage() {
  const tenant = h("input", { id: "tenant", name: "tenant", autocomplete: "organization", required: true, value: "default" });
  const email = h("input", { id: "email", name: "email", type: "email", autocomplete: "username", required: true, value: "admin@sightline.local" });
  const password = h("input", { id: "password", name: "password", type: "password", autocomplete: "current-password", required: true });
  const note = h("p", { class: "status", role: "status" });
  const form = h("form", { class: "signin", "aria-label": "Sign in" },
    h("h2", {}, "Sign in"),
    h("label", { for: "tenant" }, "Tenant"), tenant,
    h("label", { for: "email" }, "E-mail"), email,
    h("label", { for: "password" }, "Password"), password,
    h("button", { type: "submit" }, "Sign in"), note,
    h("p", { class: "muted" }, "The embedded server's first admin password is in .sightline/initial-admin-password."));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    status(note, "Signing in…", "busy");
    try {
      await signIn(tenant.value, email.value, password.value);
      location.hash = "#/chat";
      location.reload();
    } catch (e) {
      status(note, (e as Error).message, "error");
    }
  });
  main.replaceChildren(form);
  tenant.focus();
}

async function route() {
  if (!token()) return signInPage();
  const name = location.hash.replace(/^#\//, "") || "chat";
  for (const link of document.querySelectorAll<HTMLAnchorElement>("nav a")) {
    link.toggleAttribute("aria-current", link.getAttribute("href") === `#/${name}`);
  }
  (pages[name] ?? chatPage)(main);
}

async function showWho() {
  if (!token()) return;
  try {
    const data = await call(`{ me { role plan } }`);
    who.replaceChildren(`Signed in · ${data.me.role.toLowerCase()} · ${data.me.plan} plan `,
      h("button", { type: "button", class: "link", onclick: signOut }, "Sign out"));
    if (["OWNER", "ADMIN"].includes(data.me.role)) showOperations();
  } catch (e) {
    if (String((e as Error).message).startsWith("UNAUTHENTICATED")) signOut();
    else who.textContent = (e as Error).message;
  }
}

// Admins see the operations view (the server refuses its query to anyone else).
function showOperations() {
  const usage = document.querySelector('nav a[href="#/usage"]');
  const link = h("a", { href: "#/operations" }, "Operations");
  link.toggleAttribute("aria-current", location.hash === "#/operations");
  usage?.after(link);
}

async function showDashboards() {
  try {
    const data = await call(`{ serverInfo { dashboardsUrl } }`);
    const url = data.serverInfo.dashboardsUrl;
    if (url) {
      document.querySelector("nav")?.append(h("a", { href: url, target: "_blank", rel: "noopener" }, "Dashboards"));
    }
  } catch {
    // not configured or not reachable: no link
  }
}

// The session ended on its own (its refresh token was refused): say so, and offer to sign in.
onSignedOut((reason) => {
  who.textContent = `Signed out: ${reason}`;
  signInPage();
});

window.addEventListener("hashchange", route);
void showDashboards();
void showWho();
void route();
