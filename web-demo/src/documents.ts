// Documents: upload (GraphQL multipart request), live ingestion progress, the list.
import { call, follow } from "./api";
import { h, status } from "./dom";

const JOB = `subscription($id: ID!, $after: String) { ingestionJobEvents(id: $id, after: $after) {
  __typename cursor
  ... on IngestionProgress { status done total }
  ... on IngestionCompleted { status chunks }
  ... on IngestionFailed { code message } } }`;

export function documentsPage(root: HTMLElement) {
  const file = h("input", { id: "document", type: "file", accept: ".md,.txt,.html,.pdf,.rst", required: true });
  const progress = h("progress", { max: "1", value: "0", "aria-label": "Ingestion progress" });
  const note = h("p", { class: "status", role: "status" });
  const list = h("ul", { class: "documents", "aria-label": "Documents" });
  const form = h("form", { "aria-label": "Upload a document" },
    h("label", { for: "document" }, "Document (Markdown, text, HTML or PDF)"), file,
    h("button", { type: "submit" }, "Upload"), progress, note);
  root.replaceChildren(h("section", {}, h("h2", {}, "Documents"), form, h("h3", {}, "In the knowledge base"), list));

  async function refresh() {
    try {
      const data = await call(`{ documents(first: 50) { edges { node { id title chunkCount } } } }`);
      list.replaceChildren(...data.documents.edges.map((e: any) =>
        h("li", {}, `${e.node.title} — ${e.node.chunkCount} passages`)));
    } catch (e) {
      status(note, (e as Error).message, "error");
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const chosen = file.files?.[0];
    if (!chosen) return;
    status(note, `Uploading ${chosen.name}…`, "busy");
    progress.value = 0;
    try {
      const data = await call(
        `mutation($f: Upload!, $s: String) { ingestDocument(file: $f, source: $s) { id } }`,
        { f: chosen, s: chosen.name },
      );
      follow<{ ingestionJobEvents: any }>(JOB, { id: data.ingestDocument.id }, ({ ingestionJobEvents: e }) => {
        if (e.__typename === "IngestionProgress") {
          progress.max = Math.max(1, e.total);
          progress.value = e.done;
          status(note, `${e.status}: ${e.done} of ${e.total} passages`, "busy");
        } else if (e.__typename === "IngestionCompleted") {
          progress.value = progress.max;
          status(note, e.status === "unchanged" ? "Unchanged: already ingested." : `Ingested ${e.chunks} passages.`);
          void refresh();
        } else if (e.__typename === "IngestionFailed") {
          status(note, `${e.code}: ${e.message}`, "error");
        }
      }, (error) => error && status(note, error, "error"),
      // a dropped socket or an expired token resumes the progress after the last event seen
      { cursor: ({ ingestionJobEvents: e }) => e.cursor });
    } catch (e) {
      status(note, (e as Error).message, "error");
    }
  });
  void refresh();
}
