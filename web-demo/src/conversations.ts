// The conversation list of the chat page: titles (the server gives an untitled conversation
// one after its first answer), the open one marked, rename and delete; on a phone it folds
// away behind a button so that the message box is on the first screen.
import { call } from "./api";
import { h, trashIcon } from "./dom";

export type Conversation = { id: string; title: string };

export const UNTITLED = "Untitled";

export type ConversationList = {
  element: HTMLElement;
  refresh(): Promise<Conversation[]>;
  select(id: string | null): void;
  fold(): void;
};

export function conversationList(actions: {
  open(id: string): void;
  create(): void;
  deleted(id: string): void;
  failed(message: string): void;
}): ConversationList {
  const list = h("ul", { id: "conversation-list", class: "conversations", "aria-label": "Conversations" });
  const toggle = h("button", {
    type: "button",
    class: "secondary fold",
    "aria-expanded": "false",
    "aria-controls": "conversation-list",
  }, "Conversations");
  const element = h("aside", { class: "folded" },
    h("h2", { class: "wide-only" }, "Conversations"),
    h("div", { class: "row" },
      h("button", { type: "button", onclick: () => actions.create() }, "New conversation"), toggle),
    list);
  let current: string | null = null;
  let shown: Conversation[] = [];

  function fold(folded = true) {
    element.classList.toggle("folded", folded);
    toggle.setAttribute("aria-expanded", String(!folded));
  }
  toggle.addEventListener("click", () => fold(!element.classList.contains("folded")));

  function select(id: string | null) {
    current = id;
    for (const item of list.querySelectorAll<HTMLElement>("li")) {
      const on = item.dataset.id === id;
      item.classList.toggle("current", on);
      const open = item.querySelector(".open");
      if (on) open?.setAttribute("aria-current", "true");
      else open?.removeAttribute("aria-current");
    }
  }

  function row(c: Conversation): HTMLElement {
    const name = c.title || UNTITLED;
    const open = h("button", { type: "button", class: "link open", onclick: () => actions.open(c.id) }, name);
    const rename = h("button", { type: "button", class: "icon", "aria-label": `Rename ${name}`, title: "Rename" }, "✎");
    const remove = h("button", { type: "button", class: "icon", "aria-label": `Delete ${name}`, title: "Delete" }, trashIcon());
    const item = h("li", { "data-id": c.id }, open, rename, remove);
    rename.addEventListener("click", () => editTitle(item, c));
    remove.addEventListener("click", async () => {
      if (!confirm(`Delete “${name}” and its messages?`)) return;
      try {
        await call(`mutation($id: ID!) { deleteConversation(id: $id) }`, { id: c.id });
        item.remove();
        shown = shown.filter((s) => s.id !== c.id);
        toggle.textContent = `Conversations (${shown.length})`;
        actions.deleted(c.id);
      } catch (e) {
        actions.failed((e as Error).message);
      }
    });
    return item;
  }

  function editTitle(item: HTMLElement, c: Conversation) {
    const field = h("input", { type: "text", value: c.title, "aria-label": "New title", maxlength: "200" });
    const form = h("form", { class: "rename", "aria-label": "Rename conversation" }, field,
      h("button", { type: "submit" }, "Save"),
      h("button", { type: "button", class: "secondary", onclick: () => done() }, "Cancel"));
    const before = [...item.childNodes];
    item.replaceChildren(form);
    field.focus();
    field.select();
    const done = () => {
      item.replaceChildren(...before);
      (item.querySelector(".open") as HTMLElement | null)?.focus();
    };
    field.addEventListener("keydown", (event) => {
      if (event.key === "Escape") done();
    });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const data = await call(`mutation($id: ID!, $t: String!) { renameConversation(id: $id, title: $t) { id title } }`,
          { id: c.id, t: field.value });
        c.title = data.renameConversation.title;
        const fresh = row(c);
        item.replaceWith(fresh);
        select(current);
        (fresh.querySelector(".open") as HTMLElement).focus();
      } catch (e) {
        actions.failed((e as Error).message);
      }
    });
  }

  async function refresh(): Promise<Conversation[]> {
    const data = await call(`{ conversations(first: 50) { edges { node { id title } } } }`);
    shown = data.conversations.edges.map((e: any) => e.node as Conversation);
    list.replaceChildren(...shown.map(row));
    toggle.textContent = `Conversations (${shown.length})`;
    select(current);
    return shown;
  }

  return { element, refresh, select, fold: () => fold(true) };
}
