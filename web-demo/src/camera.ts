// Live camera: frames from getUserMedia to /ws/vision/live; boxes over the video, frames per
// second and latency shown.
import { token } from "./api";
import { drawBoxes } from "./images";
import { h, status } from "./dom";

export function cameraPage(root: HTMLElement) {
  const video = h("video", { autoplay: true, muted: true, playsinline: true, "aria-label": "Camera" });
  const overlay = h("canvas", { class: "overlay", "aria-hidden": "true" });
  const start = h("button", { type: "button" }, "Start camera");
  const stopButton = h("button", { type: "button", class: "secondary", disabled: true }, "Stop");
  const note = h("p", { class: "status", role: "status" });
  const stats = h("p", { class: "stats", "aria-live": "polite" });
  root.replaceChildren(h("section", {}, h("h2", {}, "Live camera"),
    h("div", { class: "row" }, start, stopButton), note,
    h("div", { class: "stage" }, video, overlay), stats));

  let socket: WebSocket | null = null;
  let stream: MediaStream | null = null;
  let timer = 0;

  async function begin() {
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
    } catch (e) {
      status(note, `No camera: ${(e as Error).message}`, "error");
      return;
    }
    video.srcObject = stream;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}/ws/vision/live?tasks=detect,classify`);
    socket.binaryType = "arraybuffer";
    const grab = document.createElement("canvas");
    let sent = 0;
    let served = 0;
    const began = performance.now();
    socket.onopen = () => socket?.send(JSON.stringify({ type: "auth", token: token() }));
    socket.onmessage = (message) => {
      const body = JSON.parse(message.data);
      if (body.type === "ready") {
        status(note, "Streaming frames…", "busy");
        timer = window.setInterval(() => {
          if (!video.videoWidth || socket?.readyState !== WebSocket.OPEN) return;
          if (socket.bufferedAmount > 512 * 1024) return; // the network is behind: skip a frame
          grab.width = video.videoWidth;
          grab.height = video.videoHeight;
          grab.getContext("2d")?.drawImage(video, 0, 0);
          grab.toBlob((blob) => blob && blob.arrayBuffer().then((b) => socket?.send(b)), "image/jpeg", 0.7);
          sent += 1;
        }, 100);
      } else if (body.type === "result") {
        served += 1;
        const seconds = (performance.now() - began) / 1000;
        drawBoxes(overlay, body.width, body.height, body.detections?.objects ?? []);
        const top = body.classification?.classes?.[0];
        stats.textContent = `${(served / seconds).toFixed(1)} results/s · latency ${body.latencyMs} ms · ` +
          `dropped ${body.dropped} of ${sent}${top ? ` · ${top.label}` : ""}`;
      } else if (body.type === "error") {
        status(note, `${body.code}: ${body.message}`, "error");
      }
    };
    socket.onclose = (event) => {
      if (event.code === 4403) status(note, "Not allowed: sign in again.", "error");
      end();
    };
    start.disabled = true;
    stopButton.disabled = false;
  }

  function end() {
    window.clearInterval(timer);
    socket?.readyState === WebSocket.OPEN && socket.send(JSON.stringify({ type: "stop" }));
    socket = null;
    stream?.getTracks().forEach((t) => t.stop());
    stream = null;
    start.disabled = false;
    stopButton.disabled = true;
  }

  start.addEventListener("click", begin);
  stopButton.addEventListener("click", end);
  window.addEventListener("hashchange", end, { once: true });
}
