// Chat: conversations, token-by-token answers, stop, resume after a dropped connection (with
// the `after` cursor), citations that open their passage, guardrail notices.
import { call, dropConnection, follow } from "./api";
import { attachmentPicker, pictureOf } from "./attachments";
import { conversationList } from "./conversations";
import { h, status } from "./dom";
import { renderMarkdown } from "./markdown";

const EVENTS = `subscription($r: ID!, $a: String) { runEvents(runId: $r, after: $a) {
  __typename cursor
  ... on RunStarted { model modelAlias modelVersion }
  ... on TokenDelta { text }
  ... on CitationAdded { index chunkId title confidence explicit }
  ... on GuardrailTriggered { stage rail action reason }
  ... on ToolCallStarted { name }
  ... on RunFailed { code message }
} }`;

type Event = { __typename: string; cursor: string; [key: string]: any };
/** A citation as CitationAdded streams it and Message.citations keeps it. */
type Citation = { index: number; chunkId: string; title: string; confidence: number; explicit: boolean };
/** The model version that wrote an answer (Message.model, RunStarted's model fields). */
type Served = { alias: string | null; name: string | null; version: string | null };

export function chatPage(root: HTMLElement) {
  const list = conversationList({
    open: (id) => void open(id),
    create: () => void newConversation(),
    deleted: (id) => {
      if (id !== conversation) return;
      conversation = null;
      log.replaceChildren();
      void loadConversations();
    },
    failed: (message) => status(note, message, "error"),
  });
  const log = h("div", { class: "log", role: "log", "aria-live": "polite", "aria-label": "Messages" });
  const note = h("p", { class: "status", role: "status" });
  const input = h("textarea", { id: "message", rows: "2", required: true, placeholder: "Ask something…" });
  const send = h("button", { type: "submit" }, "Send");
  const stop = h("button", { type: "button", class: "secondary", disabled: true }, "Stop");
  const drop = h("button", { type: "button", class: "secondary", title: "Simulate a network drop" }, "Drop connection");
  const pictures = attachmentPicker((message) => status(note, message, "error"));
  const form = h(
    "form",
    { class: "composer", "aria-label": "New message" },
    h("label", { for: "message", class: "visually-hidden" }, "Message"),
    input,
    pictures.chips,
    h("div", { class: "row" }, send, stop, pictures.button, pictures.input, drop),
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
  let answerText = ""; // the Markdown streamed so far, rendered again as it grows

  root.replaceChildren(
    h("section", { class: "chat" },
      list.element,
      h("div", { class: "thread" }, h("h2", {}, "Chat"), log, note, form)),
  );

  async function loadConversations() {
    status(note, "Loading conversations…", "busy");
    try {
      const shown = await list.refresh();
      list.select(conversation);
      status(note, "");
      if (!conversation && shown.length) await open(shown[0].id);
    } catch (e) {
      status(note, String((e as Error).message), "error");
    }
  }

  // A message sent while a new conversation is being created goes to the new one.
  let creating: Promise<void> | null = null;

  function newConversation(): Promise<void> {
    creating ??= (async () => {
      try {
        // untitled: the server names it after the first question once it is answered
        const data = await call(`mutation { createConversation(title: "") { id } }`);
        conversation = data.createConversation.id;
        log.replaceChildren();
        await loadConversations();
        list.fold();
        input.focus();
      } catch (e) {
        status(note, String((e as Error).message), "error");
      } finally {
        creating = null;
      }
    })();
    return creating;
  }

  async function open(id: string) {
    conversation = id;
    list.select(id);
    list.fold();
    status(note, "Loading messages…", "busy");
    try {
      const data = await call(
        `query($c: ID!) { conversation(id: $c) { messages(first: 50) { edges { node {
          role content attachments citations { index chunkId title confidence explicit }
          model { alias name version } } } } } }`,
        { c: id },
      );
      if (conversation !== id) return; // another one was opened meanwhile
      log.replaceChildren();
      for (const e of data.conversation.messages.edges) {
        const role = e.node.role.toLowerCase();
        const body = bubble(role, e.node.content, e.node.attachments.map((a: string) => pictureOf(a) ?? null));
        if (e.node.model) served(body, e.node.model as Served);
        for (const c of e.node.citations as Citation[]) cite(body, c); // as they came live
      }
      status(note, "");
    } catch (e) {
      status(note, String((e as Error).message), "error");
    }
  }

  /** A message: the user's as typed (with the pictures it attached), the assistant's as
   * Markdown rendered safely. `pictures`: object URLs, null for a picture not at hand. */
  function bubble(role: string, text: string, pictures: (string | null)[] = []): HTMLElement {
    const body = h("div", { class: "text" });
    if (role === "assistant") body.append(renderMarkdown(text));
    else body.append(text);
    const shown = pictures.map((url) =>
      url ? h("img", { src: url, alt: "Attached image" }) : h("span", { class: "muted" }, "🖼 attached image"));
    const el = h("div", { class: `message ${role}` },
      h("span", { class: "who" }, role === "user" ? "You" : "Assistant"),
      shown.length ? h("div", { class: "pictures" }, ...shown) : null,
      body);
    log.append(el);
    log.scrollTop = log.scrollHeight;
    return body;
  }

  /** Which model version wrote an answer: `alias@version`, the endpoint's model name on hover. */
  function served(answerBody: HTMLElement, model: Served) {
    const who = answerBody.parentElement?.querySelector(".who");
    if (!who || !model.version || who.querySelector(".model")) return;
    who.append(" ", h("span", {
      class: "model",
      title: model.name ? `Model ${model.name}` : undefined,
    }, `${model.alias ?? "model"}@${model.version}`));
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
      case "RunStarted":
        served(answer, { alias: event.modelAlias, name: event.model, version: event.modelVersion });
        break;
      case "TokenDelta":
        answerText += event.text;
        answer.replaceChildren(renderMarkdown(answerText));
        log.scrollTop = log.scrollHeight;
        break;
      case "RunCompleted":
        void list.refresh(); // a first answer gives the conversation its title
        break;
      case "CitationAdded":
        cite(answer, event as unknown as Citation);
        break;
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

  /** A source the answer cites, once per source under the answer: a button that opens the
   * passage. One attributed by similarity (the model wrote no [n]) says how close it came. */
  function cite(answerBody: HTMLElement, c: Citation) {
    const message = answerBody.parentElement;
    if (!message || message.querySelector(`.citation[data-index="${c.index}"]`)) return;
    message.append(h("button", {
      type: "button",
      class: c.explicit ? "citation" : "citation attributed",
      "data-index": String(c.index),
      title: c.explicit ? undefined : `Matched by similarity (${c.confidence.toFixed(2)})`,
      onclick: () => openChunk(c.chunkId, c.title),
    }, `[${c.index}] ${c.title}`));
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
    if (creating) await creating;
    if (!conversation) await newConversation();
    send.disabled = true;
    const attached = pictures.take();
    status(note, attached ? "Analysing the attached images…" : "Sending…", "busy");
    try {
      const attachments = attached ? await attached.ids : null;
      status(note, "Sending…", "busy");
      const data = await call(
        `mutation($c: ID!, $m: String!, $a: [ID!]) { sendMessage(conversationId: $c, content: $m, attachments: $a) { run { id } } }`,
        { c: conversation, m: content, a: attachments },
      );
      input.value = "";
      pictures.clear();
      bubble("user", content, attached?.urls ?? []);
      answerText = "";
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
