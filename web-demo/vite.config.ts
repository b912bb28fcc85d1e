import { defineConfig } from "vite";

// The built page is committed and served by the backend at `/` (no CDN, works offline).
export default defineConfig({
  base: "/",
  // assetsInlineLimit 0: the favicon stays a file under /assets (no data: URL to allow).
  build: { outDir: "../backend/web/static", emptyOutDir: true, sourcemap: false, assetsInlineLimit: 0 },
});
