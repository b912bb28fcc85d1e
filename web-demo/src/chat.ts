// Chat: conversations, token-by-token answers, stop, resume after a dropped connection (with
// the `after` cursor), citations that open their passage, guardrail notices.
import { call, dropConnection, follow } from "./api";
import { h, status } from "./dom";

const EVENTS = `subscription($r: ID!, $a: String) { runEvents(runId: $r, after: $a) {
  __typename cursor
  ... on TokenDelta { text }
  ... on CitationAdded { index chunkId title }
  ... on GuardrailTriggered { stage rail action reason }
  ... on ToolCallStarted { name }
  ... on RunFailed { code message }
} }`;

type Event = { __typename: string; cursor: string; [key: string]: any };

export function chatPage(root: HTMLElement) {
  const list = h("ul", { class: "conversations", "aria-label": "Conversations" });
  const log = h("div", { class: "log", role: "log", "aria-live": "polite", "aria-label": "Messages" });
  const note = h("p", { class: "status", role: "status" });
  const input = h("textarea", { id: "message", rows: "2", required: true, placeholder: "Ask something…" });
  const send = h("button", { type: "submit" }, "Send");
  const stop = h("button", { type: "button", class: "secondary", disabled: true }, "Stop");
  const drop = h("button", { type: "button", class: "secondary", title: "Simulate a network drop" }, "Drop connection");
  const form = h(
    "form",
    { class: "composer", "aria-label": "New message" },
    h("label", { for: "message", class: "visually-hidden" }, "Message"),
    input,
    h("div", { class: "row" }, send, stop, drop),
  );
  let conversation: string | null = null;
  type Running = {
    run: string;
    cursor: string | null;
    stream: { stop(): void } | null;
    seen: Set<string>;
  };
  let running: Running | null = null;
  let answer: HTMLElement | null = null;

  root.replaceChildren(
    h("section", { class: "chat" },
      h("aside", {},
        h("h2", {}, "Conversations"),
        h("button", { type: "button", onclick: () => newConversation() }, "New conversation"),
        list),
      h("div", { class: "thread" }, h("h2", {}, "Chat"), log, note, form)),
  );

  async function loadConversations() {
    status(note, "Loading conversations…", "busy");
    try {
      const data = await call(`{ conversations(first: 20) { edges { node { id title } } } }`);
      list.replaceChildren(
        ...data.conversations.edges.map((e: any) =>
          h("li", {}, h("button", { type: "button", class: "link", onclick: () => open(e.node.id) }, e.node.title)),
        ),
      );
      status(note, "");
      if (!conversation && data.conversations.edges.length) await open(data.conversations.edges[0].node.id);
    } catch (e) {
      status(note, String((e as Error).message), "error");
    }
  }

  async function newConversation() {
    try {
      const data = await call(`mutation { createConversation(title: "Demo chat") { id } }`);
      conversation = data.createConversation.id;
      log.replaceChildren();
      await loadConversations();
      input.focus();
    } catch (e) {
      status(note, String((e as Error).message), "error");
    }
  }

  async function open(id: string) {
    conversation = id;
    status(note, "Loading messages…", "busy");
    try {
      const data = await call(
        `query($c: ID!) { conversation(id: $c) { messages(first: 50) { edges { node { role content } } } } }`,
        { c: id },
      );
      log.replaceChildren();
      for (const e of data.conversation.messages.edges) bubble(e.node.role.toLowerCase(), e.node.content);
      status(note, "");
    } catch (e) {
      status(note, String((e as Error).message), "error");
    }
  }

  function bubble(role: string, text: string): HTMLElement {
    const el = h("div", { class: `message ${role}` }, h("span", { class: "who" }, role === "user" ? "You" : "Assistant"), h("div", { class: "text" }, text));
    log.append(el);
    log.scrollTop = log.scrollHeight;
    return el.querySelector(".text") as HTMLElement;
  }

  function subscribe() {
    if (!running) return;
    const current = running;
    // A dropped socket or an expired token does not end the stream: `follow` subscribes again
    // after the last event seen (`after`), on a new socket, with a renewed token.
    current.stream = follow<{ runEvents: Event }>(
      EVENTS,
      { r: current.run, a: current.cursor },
      ({ runEvents: event }) => handle(current, event),
      (error) => {
        if (error) status(note, error, "error");
        if (running === current) finish();
      },
      {
        variable: "a",
        cursor: ({ runEvents: event }) => event.cursor,
        lost: () => {
          if (running === current) status(note, "Connection lost — reconnecting…", "busy");
        },
        resumed: (cursor) => {
          if (running === current) status(note, `Reconnected — resumed after cursor ${cursor ?? "(start)"}`, "info");
        },
      },
    );
  }

  function handle(current: Running, event: Event) {
    if (current.seen.has(event.cursor)) return; // never twice, even after a resume
    current.seen.add(event.cursor);
    current.cursor = event.cursor;
    if (!answer) return;
    switch (event.__typename) {
      case "TokenDelta":
        answer.append(event.text);
        log.scrollTop = log.scrollHeight;
        break;
      case "CitationAdded": {
        const link = h("button", { type: "button", class: "citation", onclick: () => openChunk(event.chunkId, event.title) }, `[${event.index}] ${event.title}`);
        answer.parentElement?.append(link);
        break;
      }
      case "GuardrailTriggered":
        answer.parentElement?.append(h("p", { class: "notice", role: "note" }, `Guardrail ${event.rail} (${event.stage}): ${event.action} — ${event.reason}`));
        break;
      case "ToolCallStarted":
        status(note, `Using ${event.name}…`, "busy");
        break;
      case "RunFailed":
        status(note, `${event.code}: ${event.message}`, "error");
        break;
      case "RunCancelled":
        status(note, "Stopped.");
        break;
    }
  }

  async function openChunk(id: string, title: string) {
    try {
      const data = await call(`query($id: ID!) { chunk(id: $id) { text heading page } }`, { id });
      const dialog = h("dialog", { "aria-label": `Source: ${title}` },
        h("h3", {}, title),
        h("p", { class: "muted" }, [data.chunk.heading, data.chunk.page ? `page ${data.chunk.page}` : ""].filter(Boolean).join(" · ")),
        h("p", {}, data.chunk.text),
        h("form", { method: "dialog" }, h("button", {}, "Close")));
      document.body.append(dialog);
      dialog.addEventListener("close", () => dialog.remove());
      dialog.showModal();
    } catch (e) {
      status(note, String((e as Error).message), "error");
    }
  }

  function finish() {
    running?.stream?.stop();
    running = null;
    answer = null;
    send.disabled = false;
    stop.disabled = true;
    if (note.dataset.kind === "busy") status(note, "");
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const content = input.value.trim();
    if (!content) return;
    if (!conversation) await newConversation();
    send.disabled = true;
    status(note, "Sending…", "busy");
    try {
      const data = await call(
        `mutation($c: ID!, $m: String!) { sendMessage(conversationId: $c, content: $m) { run { id } } }`,
        { c: conversation, m: content },
      );
      input.value = "";
      bubble("user", content);
      answer = bubble("assistant", "");
      running = { run: data.sendMessage.run.id, cursor: null, stream: null, seen: new Set() };
      stop.disabled = false;
      status(note, "Answering…", "busy");
      subscribe();
    } catch (e) {
      send.disabled = false;
      status(note, String((e as Error).message), "error");
    }
  });

  stop.addEventListener("click", async () => {
    if (!running) return;
    try {
      await call(`mutation($r: ID!) { cancelRun(runId: $r) { id } }`, { r: running.run });
    } catch (e) {
      status(note, String((e as Error).message), "error");
    }
  });

  drop.addEventListener("click", () => dropConnection());

  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  void loadConversations();
}
