// zimage playground (docs/design.md#the-playground): plain JavaScript, no build step, no
// framework, nothing from another site. It talks only to the gateway on this
// origin: <base>/config.json (no auth), /v1/models, /v1/images/generations
// and /v1/images/edits, with the client key as a Bearer token.
"use strict";

(() => {
	const base = document.body.dataset.base || "/playground";
	const KEY = "zimage.playground.key";
	const HISTORY = "zimage.playground.history";
	const HISTORY_MAX = 60;
	const SEED_LIMIT = 2147483647; // seeds are in [0, SEED_LIMIT)
	// the six ratios and their sizes (ratio.go), sent as `size`
	const SIZES = {
		"1:1": [2048, 2048],
		"1:2": [1024, 2048],
		"3:2": [1920, 1280],
		"3:4": [1536, 2048],
		"16:9": [2048, 1152],
		"9:16": [1152, 2048],
	};
	const EDIT_TYPES = ["image/png", "image/jpeg", "image/webp"];

	const $ = (id) => document.getElementById(id);

	// el builds an element: props are DOM properties, except "class",
	// "text" and attributes given as "attr:name" (never a style: the CSP
	// allows no inline style).
	function el(tag, props = {}, ...children) {
		const e = document.createElement(tag);
		for (const [k, v] of Object.entries(props)) {
			if (v === undefined || v === null) continue;
			if (k === "class") e.className = v;
			else if (k === "text") e.textContent = v;
			else if (k.startsWith("attr:")) e.setAttribute(k.slice(5), v);
			else e[k] = v;
		}
		for (const c of children) if (c) e.append(c);
		return e;
	}

	// The page moves focus only in answer to what the person just did; a
	// 401 that comes back while they have moved on to another field (Tab
	// from the key field, then typing the prompt) must not pull focus or
	// clear anything, or what they type next would land in the key field
	// and be sent as the key. personAt is when they last went into a field
	// to type or typed themselves; focus the page gives (focusOn) and
	// buttons do not count.
	let ownFocus = null;
	let personAt = 0;
	function focusOn(e) {
		ownFocus = e;
		e.focus();
		ownFocus = null;
	}
	const typedIn = (e) => e && (e.tagName === "TEXTAREA" ||
		(e.tagName === "INPUT" && ["text", "password", "search", "number", "email", "url", "tel"].includes(e.type)));
	document.addEventListener("focusin", (e) => {
		if (e.target !== ownFocus && typedIn(e.target)) personAt = performance.now();
	});
	document.addEventListener("input", (e) => {
		if (e.isTrusted) personAt = performance.now();
	});

	let config = { edit_models: [], store: false, enhance: true, demo: false, key_required: true };
	let defaultModel = "";
	let running = null; // the AbortController of the generation in flight
	let editFile = null;
	let editPreviewURL = "";

	// ---- storage (localStorage can be missing or full: the page still works)

	function load(name, fallback) {
		try {
			const v = localStorage.getItem(name);
			return v === null ? fallback : JSON.parse(v);
		} catch {
			return fallback;
		}
	}
	function save(name, value) {
		try {
			localStorage.setItem(name, JSON.stringify(value));
			return true;
		} catch {
			return false;
		}
	}
	const getKey = () => {
		const k = load(KEY, "");
		return typeof k === "string" ? k : "";
	};

	// ---- the API

	class APIError extends Error {
		constructor(status, message) {
			super(message);
			this.status = status;
		}
	}

	// api calls this site's API and returns the decoded JSON, or throws an
	// APIError carrying the gateway's own message (the OpenAI error envelope).
	async function api(path, init = {}) {
		const headers = new Headers(init.headers || {});
		const sentAt = performance.now();
		const key = getKey();
		if (key) headers.set("Authorization", "Bearer " + key);
		let resp;
		try {
			resp = await fetch(path, { ...init, headers, credentials: "same-origin", cache: "no-store" });
		} catch (e) {
			if (e.name === "AbortError") throw e;
			throw new APIError(0, "Could not reach the gateway: " + e.message);
		}
		const text = await resp.text();
		let body = null;
		try {
			body = text ? JSON.parse(text) : null;
		} catch {
			body = null;
		}
		if (!resp.ok) {
			const msg = body && body.error && body.error.message;
			const err = new APIError(resp.status, msg || (resp.status + " " + resp.statusText + (text ? ": " + text.slice(0, 300) : "")));
			err.sentAt = sentAt;
			err.key = key;
			throw err;
		}
		if (body === null) throw new APIError(resp.status, "The gateway answered something that is not JSON");
		return body;
	}

	// ---- the key

	// askKey opens the key panel with message and puts focus in the field:
	// for a person who asked for it (the key button, Generate without a
	// key). The field shows the key in force when the panel opens; an open
	// panel keeps what is typed in it, and a refused key is selected, so
	// that typing replaces it.
	function askKey(message, focus = true) {
		const opening = $("key-panel").hidden;
		$("key-panel").hidden = false;
		$("key-button").setAttribute("aria-expanded", "true");
		$("key-message").textContent = message ||
			"Enter one of this gateway's client keys. It stays in this browser and is sent only to this site.";
		if (opening) $("key-input").value = getKey();
		if (!focus) return;
		focusOn($("key-input"));
		if (refusedKey && $("key-input").value.trim() === refusedKey) $("key-input").select();
	}
	function closeKey() {
		$("key-input").value = ""; // askKey shows the key in force when it opens
		$("key-panel").hidden = true;
		$("key-button").setAttribute("aria-expanded", "false");
	}
	function showKeyState() {
		const has = getKey() !== "";
		$("key-button").textContent = !config.key_required ? "No key needed" : has ? "API key ✓" : "Set API key";
	}

	// useTypedKey makes what is typed in the key field the key:
	// Generate, Enter or leaving the field uses it and keeps it, with no
	// separate save step to forget. It returns the key in force.
	function useTypedKey() {
		if ($("key-panel").hidden) return getKey(); // the field is not in use
		const k = $("key-input").value.trim();
		// the key the gateway just refused is not tried again
		if (k === "" || k === getKey() || k === refusedKey) return getKey();
		refusedKey = "";
		refusal = "";
		$("key-input").removeAttribute("aria-invalid");
		save(KEY, k);
		showKeyState();
		hideError($("error"));
		loadModels();
		return k;
	}

	// refused handles a 401: the stored key is wrong, so it goes, and the
	// page asks for another in sentences, the gateway's own message after,
	// which stays until a new key is tried. Focus goes to the key field only
	// if the person has not moved to another field or typed since the call
	// was made; the field is never cleared under them.
	let refusedKey = ""; // the key the gateway refused last
	let refusal = ""; // the gateway's message for it
	function refused(err) {
		try {
			localStorage.removeItem(KEY);
		} catch {
			// nothing stored
		}
		refusedKey = err.key || "";
		refusal = err.message;
		$("key-input").setAttribute("aria-invalid", "true");
		showKeyState();
		const a = document.activeElement;
		const elsewhere = typedIn(a) && a !== $("key-input") && personAt >= err.sentAt;
		askKey(keyRequest("use the gateway"), !elsewhere);
	}
	// keyRequest asks for a key to do what, with the gateway's message for
	// the key it refused, if one was.
	function keyRequest(what) {
		if (!refusal) return "Enter a client key to " + what + ".";
		return "The gateway refused this key. Enter a valid client key" +
			(what === "use the gateway" ? "." : " to " + what + ".") + " " + refusal;
	}

	// ---- errors and status

	function showError(box, msg) {
		box.textContent = msg;
		box.hidden = false;
	}
	function hideError(box) {
		box.textContent = "";
		box.hidden = true;
	}
	function fail(box, err) {
		if (err.status === 401) {
			showError(box, "401 Unauthorized: " + err.message);
			refused(err);
			return;
		}
		showError(box, (err.status ? err.status + ": " : "") + err.message);
	}

	// timer shows the time since start in out until stop is called.
	function timer(out) {
		const start = performance.now();
		const tick = () => {
			out.textContent = ((performance.now() - start) / 1000).toFixed(1) + " s";
		};
		tick();
		const id = setInterval(tick, 100);
		return () => {
			clearInterval(id);
			tick();
			return (performance.now() - start) / 1000;
		};
	}

	// ---- ratios and names

	function gcd(a, b) {
		while (b) [a, b] = [b, a % b];
		return a;
	}
	// ratioOf names a size: one of the six when it is one, W:H reduced when
	// that is a ratio people know (4:3, 21:9, 16:10), else the nearest of the
	// six with "≈" (an edit keeps its source's size: 1280×1168 is "≈1:1",
	// not 80:73).
	function ratioOf(w, h) {
		for (const [r, [sw, sh]] of Object.entries(SIZES)) if (sw === w && sh === h) return r;
		const d = gcd(w, h) || 1;
		const [a, b] = [w / d, h / d];
		if ((a <= 5 && b <= 5) || ["16:9", "9:16", "21:9", "9:21", "8:5", "5:8"].includes(a + ":" + b)) return a + ":" + b;
		let best = "1:1";
		for (const [r, [sw, sh]] of Object.entries(SIZES)) {
			const [bw, bh] = SIZES[best];
			if (Math.abs(Math.log((w / h) * (sh / sw))) < Math.abs(Math.log((w / h) * (bh / bw)))) best = r;
		}
		return "\u2248" + best;
	}
	function fileName(item) {
		const m = /\.(png|jpe?g|webp|gif)(?:$|[?#])/i.exec(item.url || "");
		const ext = m ? m[1].toLowerCase().replace("jpeg", "jpg") : "png";
		const size = item.width ? "-" + item.width + "x" + item.height : "";
		return "zimage-" + (item.kind === "edit" ? "edit" : item.seed) + size + "." + ext;
	}
	function metaText(item) {
		const parts = [];
		if (item.kind === "edit") parts.push("edit");
		if (item.width && item.height) {
			const shown = ratioOf(item.width, item.height);
			parts.push(item.ratio === "auto" ? "auto → " + shown : shown);
			parts.push(item.width + "×" + item.height);
		} else if (item.ratio) {
			parts.push(item.ratio);
		}
		if (item.kind !== "edit" && item.seed !== undefined) parts.push("seed " + item.seed);
		if (item.model) parts.push(item.model);
		return parts.join(" · ");
	}
	function newID(i) {
		return Date.now().toString(36) + "-" + i + "-" + Math.random().toString(36).slice(2, 8);
	}

	// ---- cards: one image with its facts, in the results and the history

	function shot(item, onSize) {
		const img = el("img", {
			class: "shot",
			src: item.url,
			alt: (item.kind === "edit" ? "Edited image: " : "Generated image: ") + (item.revised || item.prompt || "").slice(0, 160),
			decoding: "async",
		});
		// the expected size gives the box its aspect ratio before the load
		const expected = item.width ? [item.width, item.height] : SIZES[item.ratio];
		if (expected) {
			img.width = expected[0];
			img.height = expected[1];
		}
		img.addEventListener("load", () => {
			img.width = img.naturalWidth;
			img.height = img.naturalHeight;
			if (onSize) onSize(img.naturalWidth, img.naturalHeight);
		});
		img.addEventListener("error", () => {
			img.replaceWith(el("div", { class: "gone", text: "This image is no longer available." }));
		});
		return img;
	}

	function card(item, opts = {}) {
		const c = el(opts.tag || "figure", { class: "card" + (item.sourceURL ? " pair" : "") });
		const meta = el("p", { class: "meta", text: metaText(item) });
		// the history's cards are small: short labels, the long ones for
		// assistive technology
		const open = el("a", { class: "button ghost small", href: item.url, target: "_blank", rel: "noopener noreferrer", text: opts.reuse ? "Open" : "Open full size" });
		if (opts.reuse) open.setAttribute("aria-label", "Open full size");
		const download = el("a", { class: "button ghost small", href: item.url, target: "_blank", rel: "noopener noreferrer", text: "Download" });
		download.download = fileName(item);
		const img = shot(item, (w, h) => {
			if (item.width !== w || item.height !== h) {
				item.width = w;
				item.height = h;
				updateHistory(item);
			}
			meta.textContent = metaText(item);
			download.download = fileName(item);
		});
		if (item.sourceURL) {
			const src = el("img", { class: "shot", src: item.sourceURL, alt: "The source image" });
			c.append(el("div", { class: "frames" },
				el("div", { class: "frame" }, src, el("span", { class: "tag", text: "Source" })),
				el("div", { class: "frame" }, img, el("span", { class: "tag", text: "Edit" }))));
		} else {
			c.append(el("div", { class: "frame" }, img));
		}
		const text = item.revised || item.prompt || "";
		const prompt = el("p", { class: "prompt", text });
		if (item.prompt && item.revised && item.prompt !== item.revised) prompt.title = "Your prompt: " + item.prompt;
		const links = el("div", { class: "links" }, open, download);
		if (opts.reuse) {
			links.append(el("button", { type: "button", class: "ghost small", text: "Reuse", onclick: () => reuse(item) }));
		}
		c.append(el(opts.tag === "li" ? "div" : "figcaption", { class: "caption" }, prompt, meta, links));
		return c;
	}

	// ---- history: this browser's generations, newest first

	function history() {
		const h = load(HISTORY, []);
		return Array.isArray(h) ? h.filter((x) => x && typeof x.url === "string") : [];
	}
	function storeHistory(h) {
		while (!save(HISTORY, h) && h.length > 1) h = h.slice(0, Math.ceil(h.length / 2)); // full: keep the newest
	}
	function addHistory(items) {
		const keep = items.map(({ sourceURL, ...rest }) => rest); // a blob: URL dies with the page
		storeHistory([...keep, ...history()].slice(0, HISTORY_MAX));
		renderHistory();
	}
	function updateHistory(item) {
		const h = history();
		const i = h.findIndex((x) => x.id === item.id);
		if (i >= 0 && (h[i].width !== item.width || h[i].height !== item.height)) {
			h[i] = { ...h[i], width: item.width, height: item.height };
			storeHistory(h);
		}
	}
	function renderHistory() {
		const h = history();
		$("history").replaceChildren(...h.map((item) => card(item, { tag: "li", reuse: true })));
		$("history-empty").hidden = h.length > 0;
		$("history-clear").hidden = h.length === 0;
	}
	function reuse(item) {
		if (item.kind === "edit") {
			// the instruction and the model; the source was this page's own
			// file, which the history does not keep
			$("edit-prompt").value = item.prompt || "";
			if (item.model && [...$("edit-model").options].some((o) => o.value === item.model)) $("edit-model").value = item.model;
			$("edit-status").textContent = editFile ? "" : "Pick or drop the source image again.";
			focusOn($("edit-prompt"));
			return;
		}
		$("prompt").value = item.prompt || "";
		setRatio(SIZES[item.ratio] ? item.ratio : "auto");
		$("seed").value = item.seed ?? "";
		if (item.model && [...$("model").options].some((o) => o.value === item.model)) $("model").value = item.model;
		focusOn($("prompt"));
	}

	// showResults brings the results into view where they are below the
	// forms (one column, a phone)
	function showResults() {
		if (!matchMedia("(max-width: 760px)").matches) return;
		const still = matchMedia("(prefers-reduced-motion: reduce)").matches;
		$("results-title").scrollIntoView({ behavior: still ? "auto" : "smooth", block: "start" });
	}

	// ---- the ratio radios

	function currentRatio() {
		const r = document.querySelector('input[name="ratio"]:checked');
		return r ? r.value : "auto";
	}
	function setRatio(value) {
		const r = document.querySelector('input[name="ratio"][value="' + value + '"]');
		if (r) r.checked = true;
		showRatio();
	}
	function showRatio() {
		const r = currentRatio();
		$("ratio-hint").textContent = SIZES[r]
			? r + " is " + SIZES[r].join("×") + " pixels."
			: "auto: a ratio written in the prompt (\u201cratio 16:9\u201d) or the LLM's choice, else 1:1.";
	}

	// ---- generate

	function randomSeed(n) {
		const u = new Uint32Array(1);
		crypto.getRandomValues(u);
		return u[0] % (SEED_LIMIT - n + 1); // seed, seed+1, … stay in range
	}

	function pendingCards(n, ratio) {
		const cls = "wait r-" + (SIZES[ratio] ? ratio.replace(":", "-") : "1-1");
		const cards = [];
		for (let i = 0; i < n; i++) {
			cards.push(el("figure", { class: "card pending", "attr:aria-hidden": "true" },
				el("div", { class: cls, text: "generating…" })));
		}
		return cards;
	}

	async function generate() {
		const box = $("error");
		hideError(box);
		if (running) return;
		const prompt = $("prompt").value.trim();
		if (!prompt) {
			showError(box, "Write a prompt first.");
			focusOn($("prompt"));
			return;
		}
		if (config.key_required && !useTypedKey()) {
			askKey(keyRequest("generate"));
			return;
		}
		if (!$("key-panel").hidden) closeKey();
		const n = Number($("n").value) || 1;
		const ratio = currentRatio();
		const seedText = $("seed").value.trim();
		let seed;
		if (seedText === "") {
			seed = randomSeed(n);
		} else {
			seed = Number(seedText);
			if (!Number.isInteger(seed) || seed < 0 || seed + n > SEED_LIMIT) {
				showError(box, "The seed must be a whole number from 0 to " + (SEED_LIMIT - n) + ".");
				focusOn($("seed"));
				return;
			}
		}
		// enhancement off is the skip word no-enhance, which the gateway removes
		const skip = config.enhance && !$("enhance").checked;
		const body = { prompt: skip ? prompt + " no-enhance" : prompt, n, seed, response_format: "url" };
		const model = $("model").value;
		if (model) body.model = model;
		if (SIZES[ratio]) body.size = SIZES[ratio].join("x");

		const ctrl = new AbortController();
		running = ctrl;
		$("generate").disabled = true;
		$("cancel").hidden = false;
		$("status").textContent = n === 1 ? "Generating 1 image…" : "Generating " + n + " images…";
		const pending = pendingCards(n, ratio);
		$("results").replaceChildren(...pending);
		$("results-empty").hidden = true;
		showResults();
		const stop = timer($("elapsed"));
		try {
			const res = await api("/v1/images/generations", {
				method: "POST",
				headers: { "Content-Type": "application/json" },
				body: JSON.stringify(body),
				signal: ctrl.signal,
			});
			const created = Date.now();
			const items = (res.data || []).map((d, i) => ({
				id: newID(i),
				kind: "generate",
				url: d.url,
				prompt,
				revised: d.revised_prompt || "",
				ratio,
				seed: seed + i,
				model: model || defaultModel,
				created,
			})).filter((x) => x.url);
			if (items.length === 0) throw new APIError(0, "The answer carried no image URL (response_format url)");
			$("results").replaceChildren(...items.map((item) => card(item)));
			addHistory(items);
			const s = stop();
			$("status").textContent = "Done: " + items.length + (items.length === 1 ? " image" : " images") + " in " + s.toFixed(1) + " s.";
		} catch (err) {
			stop();
			pending.forEach((p) => p.remove());
			$("results-empty").hidden = $("results").children.length > 0;
			if (err.name === "AbortError") {
				$("status").textContent = "Cancelled.";
			} else {
				$("status").textContent = "";
				fail(box, err);
			}
		} finally {
			running = null;
			$("generate").disabled = false;
			$("cancel").hidden = true;
		}
	}

	// ---- edit (multipart image + prompt)

	function setEditFile(file) {
		const box = $("edit-error");
		hideError(box);
		if (!file) return;
		if (!EDIT_TYPES.includes(file.type)) {
			showError(box, "Choose a PNG, JPEG or WebP image (this is " + (file.type || "an unknown type") + ").");
			return;
		}
		editFile = file;
		if (editPreviewURL) URL.revokeObjectURL(editPreviewURL);
		editPreviewURL = URL.createObjectURL(file);
		$("edit-preview").src = editPreviewURL;
		$("edit-preview").hidden = false;
		$("drop-text").textContent = file.name + " — drop or choose another";
	}

	async function edit() {
		const box = $("edit-error");
		hideError(box);
		if (running) return;
		if (!editFile) {
			showError(box, "Choose or drop an image first.");
			focusOn($("edit-file"));
			return;
		}
		const prompt = $("edit-prompt").value.trim();
		if (!prompt) {
			showError(box, "Write an instruction first.");
			focusOn($("edit-prompt"));
			return;
		}
		if (config.key_required && !useTypedKey()) {
			askKey(keyRequest("edit"));
			return;
		}
		if (!$("key-panel").hidden) closeKey();
		const fd = new FormData();
		fd.append("image", editFile, editFile.name || "image.png");
		fd.append("prompt", prompt);
		fd.append("model", $("edit-model").value);
		fd.append("response_format", "url");
		const ctrl = new AbortController();
		running = ctrl;
		$("edit-submit").disabled = true;
		$("generate").disabled = true;
		$("edit-status").textContent = "Editing…";
		const stop = timer($("edit-elapsed"));
		const sourceURL = editPreviewURL;
		try {
			const res = await api("/v1/images/edits", { method: "POST", body: fd, signal: ctrl.signal });
			const d = (res.data || [])[0];
			if (!d || !d.url) throw new APIError(0, "The answer carried no image URL (response_format url)");
			const item = {
				id: newID(0),
				kind: "edit",
				url: d.url,
				prompt,
				revised: d.revised_prompt || prompt,
				model: $("edit-model").value,
				created: Date.now(),
				sourceURL,
			};
			$("results").replaceChildren(card(item));
			$("results-empty").hidden = true;
			showResults();
			addHistory([item]);
			$("edit-status").textContent = "Done in " + stop().toFixed(1) + " s.";
		} catch (err) {
			stop();
			if (err.name === "AbortError") {
				$("edit-status").textContent = "Cancelled.";
			} else {
				$("edit-status").textContent = "";
				fail(box, err);
			}
		} finally {
			running = null;
			$("edit-submit").disabled = false;
			$("generate").disabled = false;
		}
	}

	// ---- start

	async function loadModels() {
		try {
			const list = await api("/v1/models");
			const names = (list.data || []).map((m) => m.id).filter((id) => !config.edit_models.includes(id));
			if (names.length > 0) {
				$("model").replaceChildren(...names.map((id) => el("option", { value: id, text: id })));
				defaultModel = names[0];
			}
		} catch (err) {
			if (err.status === 401) refused(err);
			else $("status").textContent = "Could not list the models: " + err.message;
		}
	}

	function applyConfig() {
		if (config.demo) {
			$("mode").textContent = "demo upstream: placeholder images";
			$("mode").hidden = false;
		}
		if (!config.enhance) {
			$("enhance").checked = false;
			$("enhance").disabled = true;
			$("enhance-note").hidden = false;
		}
		if (config.edit_models.length > 0) {
			$("edit-model").replaceChildren(...config.edit_models.map((id) => el("option", { value: id, text: id })));
			$("edit-panel").hidden = false;
			$("store-note").hidden = config.store;
		}
		if (!config.store && !config.demo) {
			$("history-empty").textContent += " Without the gateway's store their links are the image service's and may expire.";
		}
		showKeyState();
	}

	function wire() {
		$("gen-form").addEventListener("submit", (e) => {
			e.preventDefault();
			generate();
		});
		$("edit-form").addEventListener("submit", (e) => {
			e.preventDefault();
			edit();
		});
		// Enter (and Ctrl+Enter) in a prompt sends it; Shift+Enter is a new
		// line; a key that confirms an IME composition (Chinese input) is not
		for (const [id, form] of [["prompt", "gen-form"], ["edit-prompt", "edit-form"]]) {
			$(id).addEventListener("keydown", (e) => {
				if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
					e.preventDefault();
					$(form).requestSubmit();
				}
			});
		}
		document.addEventListener("keydown", (e) => {
			if (e.key === "Escape" && running) running.abort();
		});
		$("cancel").addEventListener("click", () => running && running.abort());
		for (const r of document.querySelectorAll('input[name="ratio"]')) r.addEventListener("change", showRatio);

		$("key-button").addEventListener("click", () => ($("key-panel").hidden ? askKey() : closeKey()));
		$("key-form").addEventListener("submit", (e) => {
			e.preventDefault();
			const k = $("key-input").value.trim();
			if (!k) {
				$("key-message").textContent = "The key is empty: paste one of the gateway's client keys.";
				focusOn($("key-input"));
				return;
			}
			if (k === refusedKey) {
				// the key just refused: say so again rather than send it again
				askKey(keyRequest("use the gateway"));
				return;
			}
			if (k !== getKey()) useTypedKey();
			closeKey();
			focusOn($("prompt"));
		});
		// leaving the field keeps what was typed (the panel stays open, so
		// that nothing moves under a pointer on its way to Generate)
		$("key-input").addEventListener("change", useTypedKey);
		$("key-forget").addEventListener("click", () => {
			try {
				localStorage.removeItem(KEY);
			} catch {
				// nothing stored
			}
			$("key-input").value = "";
			refusedKey = "";
			refusal = "";
			$("key-input").removeAttribute("aria-invalid");
			showKeyState();
			askKey("The key is forgotten. Enter a key to use the gateway.");
		});

		$("history-clear").addEventListener("click", () => {
			storeHistory([]);
			renderHistory();
			focusOn($("prompt"));
		});

		$("edit-file").addEventListener("change", () => setEditFile($("edit-file").files[0]));
		const drop = $("drop");
		for (const t of ["dragenter", "dragover"]) {
			drop.addEventListener(t, (e) => {
				e.preventDefault();
				drop.classList.add("over");
			});
		}
		for (const t of ["dragleave", "drop"]) drop.addEventListener(t, () => drop.classList.remove("over"));
		drop.addEventListener("drop", (e) => {
			e.preventDefault();
			setEditFile(e.dataTransfer.files[0]);
		});
		// a file dropped beside the zone must not navigate away from the page
		for (const t of ["dragover", "drop"]) window.addEventListener(t, (e) => e.preventDefault());
	}

	async function start() {
		wire();
		showRatio();
		renderHistory();
		try {
			const resp = await fetch(base + "/config.json", { cache: "no-store" });
			if (resp.ok) config = { ...config, ...(await resp.json()) };
		} catch {
			// an older gateway or a network hiccup: the defaults show every control
		}
		if (!Array.isArray(config.edit_models)) config.edit_models = [];
		applyConfig();
		if (config.key_required && !getKey()) askKey();
		else loadModels();
		document.body.dataset.ready = "true"; // for the browser tests
	}

	start();
})();
