// Documents: upload (GraphQL multipart request; text documents, PDFs and images, which the
// server reads by OCR), live ingestion progress, the list with delete, search.
import { call, follow } from "./api";
import { h, status, trashIcon } from "./dom";

const JOB = `subscription($id: ID!, $after: String) { ingestionJobEvents(id: $id, after: $after) {
  __typename cursor
  ... on IngestionProgress { status done total }
  ... on IngestionCompleted { status chunks }
  ... on IngestionFailed { code message } } }`;

// What ingestDocument reads: text documents, PDFs, and images read by OCR (when the server
// runs vision; it says so otherwise).
const ACCEPTED = [".md", ".markdown", ".txt", ".rst", ".html", ".htm", ".pdf",
  ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp",
  "text/*", "application/pdf", "image/png", "image/jpeg", "image/tiff", "image/webp"].join(",");

export function documentsPage(root: HTMLElement) {
  const file = h("input", { id: "document", type: "file", accept: ACCEPTED, required: true });
  const progress = h("progress", { max: "1", value: "0", "aria-label": "Ingestion progress" });
  const note = h("p", { class: "status", role: "status" });
  const list = h("ul", { class: "documents", "aria-label": "Documents" });
  const form = h("form", { "aria-label": "Upload a document" },
    h("label", { for: "document" }, "Document (Markdown, text, HTML, PDF, or an image of text)"), file,
    h("button", { type: "submit" }, "Upload"), progress, note);
  const query = h("input", { id: "search", type: "search", required: true, autocomplete: "off" });
  const results = h("ol", { class: "results", "aria-label": "Search results" });
  const searchForm = h("form", { role: "search", "aria-label": "Search documents" },
    h("label", { for: "search" }, "Search the knowledge base"),
    h("div", { class: "row" }, query, h("button", { type: "submit" }, "Search")));
  root.replaceChildren(h("section", {}, h("h2", {}, "Documents"), form, h("h3", {}, "In the knowledge base"), list,
    h("h3", {}, "Search"), searchForm, results));

  async function refresh() {
    try {
      const data = await call(`{ documents(first: 50) { edges { node { id title chunkCount } } } }`);
      list.replaceChildren(...data.documents.edges.map((e: any) => {
        const { id, title, chunkCount } = e.node;
        const remove = h("button", { type: "button", class: "icon", "aria-label": `Delete ${title}`, title: "Delete" }, trashIcon());
        remove.addEventListener("click", async () => {
          if (!confirm(`Delete “${title}” from the knowledge base?`)) return;
          try {
            await call(`mutation($id: ID!) { deleteDocument(id: $id) }`, { id });
            status(note, `Deleted ${title}.`);
            await refresh();
          } catch (e) {
            status(note, (e as Error).message, "error");
          }
        });
        return h("li", {}, `${title} — ${chunkCount} passages `, remove);
      }));
      if (!data.documents.edges.length) list.replaceChildren(h("li", { class: "muted" }, "No documents yet."));
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
  searchForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = query.value.trim();
    if (!text) return;
    try {
      const data = await call(
        `query($q: String!) { search(query: $q, k: 5) { chunkId documentTitle heading page text score } }`,
        { q: text },
      );
      results.replaceChildren(...data.search.map((r: any) =>
        h("li", {},
          h("strong", {}, r.documentTitle),
          h("span", { class: "muted" }, [r.heading, r.page ? `page ${r.page}` : "", `score ${r.score.toFixed(3)}`].filter(Boolean).join(" · ")),
          h("p", {}, r.text))));
      if (!data.search.length) results.replaceChildren(h("li", { class: "muted" }, "Nothing found."));
    } catch (e) {
      status(note, (e as Error).message, "error");
    }
  });
  void refresh();
}
