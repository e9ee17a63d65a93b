// Playground: pick an image, ask a question, stream the answer over /ws/chat/.
"use strict";
(function () {
  var config = JSON.parse(document.getElementById("playground-config").textContent);
  var t = config.i18n;
  var $ = function (id) { return document.getElementById(id); };
  var drop = $("pg-drop"), fileInput = $("pg-file"), preview = $("pg-preview");
  var info = $("pg-file-info"), problem = $("pg-problem"), question = $("pg-question");
  var modelSelect = $("pg-model"), maxTokens = $("pg-max-tokens"), temperature = $("pg-temperature");
  var thinking = $("pg-thinking"), sendButton = $("pg-send"), stopButton = $("pg-stop");
  var statusText = $("pg-status"), answer = $("pg-answer"), reasoning = $("pg-reasoning");
  var reasoningBox = $("pg-reasoning-box"), errorText = $("pg-error"), system = $("pg-system");
  var image = null; // {dataUrl, name, type, size}
  var socket = null, startedAt = 0, firstTokenAt = 0, streaming = false;
  var codeLang = "curl";

  function humanSize(bytes) {
    if (bytes < 1024) return bytes + " B";
    if (bytes < 1024 * 1024) return (bytes / 1024).toFixed(1) + " KB";
    return (bytes / 1024 / 1024).toFixed(1) + " MB";
  }
  function format(template, values) {
    return template.replace(/%\((\w+)\)s/g, function (_, name) { return values[name]; });
  }
  // A duration in the page's language: "850 ms", "19.7 sec" ("850毫秒", "19.7秒").
  var lang = document.documentElement.lang || undefined;
  function duration(ms) {
    ms = Math.round(ms);
    try {
      if (ms < 1000) {
        return new Intl.NumberFormat(lang, { style: "unit", unit: "millisecond", unitDisplay: "short" }).format(ms);
      }
      return new Intl.NumberFormat(lang, { style: "unit", unit: "second", unitDisplay: "short",
        maximumFractionDigits: 1 }).format(ms / 1000);
    } catch (e) {
      return ms + " ms";
    }
  }
  function showProblem(text) { problem.textContent = text; problem.hidden = !text; }
  function setStatus(text) { statusText.textContent = text; }

  // Magic bytes, as the server checks them: the file name and declared type prove nothing.
  function sniff(bytes) {
    var b = new Uint8Array(bytes);
    if (b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return "image/jpeg";
    if (b[0] === 0x89 && b[1] === 0x50 && b[2] === 0x4e && b[3] === 0x47) return "image/png";
    if (b[0] === 0x47 && b[1] === 0x49 && b[2] === 0x46 && b[3] === 0x38) return "image/gif";
    if (b[0] === 0x52 && b[1] === 0x49 && b[2] === 0x46 && b[3] === 0x46 &&
        b[8] === 0x57 && b[9] === 0x45 && b[10] === 0x42 && b[11] === 0x50) return "image/webp";
    return null;
  }

  function takeFile(file) {
    if (!file) return;
    showProblem("");
    if (file.size > config.max_image_bytes) {
      showProblem(format(t.too_large, { size: humanSize(file.size), max: humanSize(config.max_image_bytes) }) +
        " (image_too_large)");
      return;
    }
    file.slice(0, 16).arrayBuffer().then(function (head) {
      var type = sniff(head);
      if (!type || config.accepted_types.indexOf(type) < 0) {
        showProblem(t.bad_type + " (unsupported_image_type)");
        return;
      }
      var reader = new FileReader();
      reader.onload = function () {
        image = { dataUrl: reader.result, name: file.name || "image", type: type, size: file.size };
        imageSent = false; // a new image goes with the next question
        preview.src = reader.result;
        preview.hidden = false;
        preview.onload = function () {
          info.textContent = image.name + " · " + humanSize(file.size) + " · " +
            preview.naturalWidth + "×" + preview.naturalHeight;
        };
        info.textContent = image.name + " · " + humanSize(file.size);
        renderCode();
      };
      reader.readAsDataURL(file);
    });
  }

  drop.addEventListener("click", function () { fileInput.click(); });
  drop.addEventListener("keydown", function (e) {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); fileInput.click(); }
  });
  fileInput.addEventListener("change", function () { takeFile(fileInput.files[0]); });
  ["dragenter", "dragover"].forEach(function (name) {
    drop.addEventListener(name, function (e) { e.preventDefault(); drop.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (name) {
    drop.addEventListener(name, function (e) { e.preventDefault(); drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (e) {
    if (e.dataTransfer && e.dataTransfer.files.length) takeFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", function (e) {
    var items = (e.clipboardData && e.clipboardData.items) || [];
    for (var i = 0; i < items.length; i++) {
      if (items[i].kind === "file") { takeFile(items[i].getAsFile()); e.preventDefault(); return; }
    }
  });

  function explain(code, message) {
    var known = config.errors[code];
    return (known || message || t.error) + " (" + code + ")";
  }

  // A conversation is one websocket: the server keeps its turns (and their images), so a
  // follow-up question on the same connection sees the image and the earlier answers.
  var imageSent = false, pendingFrame = null, done = true, turnQuestion = "";
  var historyList = $("pg-history");

  function finish(label) {
    streaming = false;
    sendButton.disabled = false;
    stopButton.disabled = true;
    setStatus(label);
  }

  function frameFor() {
    var content = [];
    if (image && !imageSent) content.push({ type: "image_url", image_url: { url: image.dataUrl } });
    content.push({ type: "text", text: question.value });
    return {
      type: "message",
      content: content,
      system: system.value || undefined,
      model: modelSelect.value,
      max_tokens: parseInt(maxTokens.value, 10) || undefined,
      temperature: parseFloat(temperature.value),
      thinking: thinking.checked,
    };
  }

  function keepTurn() {
    // The finished question and answer move into the conversation above the next answer.
    if (!answer.textContent) return;
    var item = document.createElement("li");
    var q = document.createElement("p"), a = document.createElement("div");
    q.className = "turn-question"; q.textContent = turnQuestion;
    a.className = "answer"; a.textContent = answer.textContent;
    item.appendChild(q); item.appendChild(a);
    historyList.appendChild(item);
    historyList.hidden = false;
    $("pg-new").hidden = false;
  }

  function onFrame(message) {
    var data = JSON.parse(message.data);
    if (data.type === "ready") {
      if (pendingFrame) { startedAt = performance.now(); firstTokenAt = 0; socket.send(JSON.stringify(pendingFrame)); pendingFrame = null; }
    } else if (data.type === "start") {
      setStatus(t.streaming);
      if (image) imageSent = true;
    } else if (data.type === "notice") {
      setStatus(data.code === "taken_over" ? t.taken_over : data.message);
    } else if (data.type === "delta") {
      if (!firstTokenAt) {
        firstTokenAt = performance.now();
        $("pg-ttft").textContent = duration(firstTokenAt - startedAt);
      }
      if (data.reasoning) { reasoningBox.hidden = false; reasoning.textContent += data.reasoning; }
      if (data.text) answer.textContent += data.text;
    } else if (data.type === "done") {
      done = true;
      var u = data.usage || {};
      $("pg-tokens").textContent = (u.prompt_tokens || 0) + " + " + (u.completion_tokens || 0) +
        " = " + (u.total_tokens || 0);
      $("pg-latency").textContent = duration(performance.now() - startedAt);
      answer.setAttribute("data-finish-reason", data.finish_reason || "");
      $("pg-copy-answer").hidden = !answer.textContent;
      finish(data.finish_reason === "cancelled" ? t.stopped : t.done);
    } else if (data.type === "error") {
      done = true;
      errorText.textContent = explain(data.code, data.message);
      errorText.setAttribute("data-code", data.code);
      errorText.hidden = false;
      if (["image_too_large", "unsupported_image_type", "image_decode_failed",
           "image_too_many_pixels", "malware_detected", "invalid_image_data"].indexOf(data.code) >= 0) {
        showProblem(explain(data.code, data.message));
      }
      finish(t.error);
    }
  }

  function openSocket() {
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + window.location.host + config.ws_path);
    imageSent = false;
    socket.onmessage = onFrame;
    socket.onclose = function () {
      socket = null;
      if (!done && streaming) {
        errorText.textContent = explain("connection_lost", "");
        errorText.hidden = false;
        done = true;
        finish(t.error);
      }
    };
  }

  function newConversation() {
    if (socket) { var old = socket; socket = null; old.onclose = null; old.close(); }
    imageSent = false;
    historyList.textContent = "";
    historyList.hidden = true;
    $("pg-new").hidden = true;
    $("pg-current-question").hidden = true;
    answer.textContent = "";
    answer.removeAttribute("data-finish-reason");
    $("pg-copy-answer").hidden = true;
    setStatus("");
  }

  function send(event) {
    if (event) event.preventDefault();
    if (streaming) return;
    if (!question.value.trim()) { showProblem(t.need_question); return; }
    showProblem("");
    errorText.hidden = true;
    if (answer.hasAttribute("data-finish-reason") && socket) keepTurn();
    answer.textContent = "";
    answer.removeAttribute("data-finish-reason");
    $("pg-copy-answer").hidden = true;
    reasoning.textContent = "";
    reasoningBox.hidden = true;
    $("pg-tokens").textContent = "—"; $("pg-ttft").textContent = "—"; $("pg-latency").textContent = "—";
    streaming = true;
    done = false;
    sendButton.disabled = true;
    stopButton.disabled = false;
    turnQuestion = question.value;
    $("pg-current-question").textContent = turnQuestion;
    $("pg-current-question").hidden = false;
    if (socket && socket.readyState === WebSocket.OPEN) {
      startedAt = performance.now();
      firstTokenAt = 0;
      socket.send(JSON.stringify(frameFor()));
      setStatus(t.connecting);
    } else {
      setStatus(t.connecting);
      openSocket();
      pendingFrame = frameFor();
    }
    question.value = "";
    renderCode();
  }

  $("pg-form").addEventListener("submit", send);
  // Ctrl+Enter (Cmd+Enter on a Mac) in the question sends it.
  question.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(e);
  });
  $("pg-new").addEventListener("click", newConversation);
  stopButton.addEventListener("click", function () {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "cancel" }));
  });

  // "View code": the same request through the OpenAI-compatible API.
  // Single quotes stop every expansion; a quote inside is closed, escaped and reopened.
  function shellQuote(text) { return "'" + text.replace(/'/g, "'\\''") + "'"; }
  function shellEscapeHeredoc(text) { return text.replace(/[\\$`]/g, "\\$&"); }
  function renderCode() {
    var model = modelSelect.value, max = parseInt(maxTokens.value, 10) || 256;
    var temp = parseFloat(temperature.value);
    var q = question.value || turnQuestion || "What is in this image?";
    var mediaType = image ? image.type : "image/png";
    var fileName = image ? image.name : "image.png";
    var thinkingValue = thinking.checked ? "enabled" : "disabled";
    var instructions = system.value;
    var code;
    if (codeLang === "curl") {
      var body = JSON.stringify({
        model: model, max_tokens: max, temperature: temp, stream: true,
        thinking: { type: thinkingValue },
        messages: (instructions ? [{ role: "system", content: instructions }] : []).concat([
          { role: "user", content: [
            { type: "image_url", image_url: { url: "data:" + mediaType + ";base64,__IMAGE__" } },
            { type: "text", text: q },
          ] }]),
      }, null, 2);
      // A terminator no line of the body can be (JSON lines start with a space, brace or quote).
      code = "IMAGE=$(base64 -w0 " + shellQuote(fileName) + ")\n" +
        "cat > request.json <<END_OF_REQUEST_JSON\n" + shellEscapeHeredoc(body).replace("__IMAGE__", "${IMAGE}") +
        "\nEND_OF_REQUEST_JSON\n" +
        "curl -N " + config.api_base + "/chat/completions \\\n" +
        "  -H \"Authorization: Bearer $API_KEY\" \\\n" +
        "  -H \"Content-Type: application/json\" \\\n" +
        "  --data @request.json";
    } else if (codeLang === "python") {
      code = "import base64\nimport os\n\nfrom openai import OpenAI\n\n" +
        "client = OpenAI(base_url=" + JSON.stringify(config.api_base) + ", api_key=os.environ[\"API_KEY\"])\n" +
        "with open(" + JSON.stringify(fileName) + ", \"rb\") as f:\n" +
        "    image = base64.b64encode(f.read()).decode()\n\n" +
        "stream = client.chat.completions.create(\n" +
        "    model=" + JSON.stringify(model) + ",\n" +
        "    max_tokens=" + max + ",\n" +
        "    temperature=" + temp + ",\n" +
        "    stream=True,\n" +
        "    extra_body={\"thinking\": {\"type\": \"" + thinkingValue + "\"}},\n" +
        "    messages=[\n" +
        (instructions ? "        {\"role\": \"system\", \"content\": " + JSON.stringify(instructions) + "},\n" : "") +
        "        {\"role\": \"user\", \"content\": [\n" +
        "            {\"type\": \"image_url\", \"image_url\": {\"url\": f\"data:" + mediaType + ";base64,{image}\"}},\n" +
        "            {\"type\": \"text\", \"text\": " + JSON.stringify(q) + "},\n" +
        "        ]},\n    ],\n)\n" +
        "for chunk in stream:\n" +
        "    if chunk.choices:\n" +
        "        print(chunk.choices[0].delta.content or \"\", end=\"\", flush=True)\n";
    } else {
      code = "import fs from \"node:fs\";\nimport OpenAI from \"openai\";\n\n" +
        "const client = new OpenAI({ baseURL: " + JSON.stringify(config.api_base) + ", apiKey: process.env.API_KEY });\n" +
        "const image = fs.readFileSync(" + JSON.stringify(fileName) + ").toString(\"base64\");\n\n" +
        "const stream = await client.chat.completions.create({\n" +
        "  model: " + JSON.stringify(model) + ",\n" +
        "  max_tokens: " + max + ",\n" +
        "  temperature: " + temp + ",\n" +
        "  stream: true,\n" +
        "  thinking: { type: \"" + thinkingValue + "\" },\n" +
        "  messages: [\n" +
        (instructions ? "    { role: \"system\", content: " + JSON.stringify(instructions) + " },\n" : "") +
        "    { role: \"user\", content: [\n" +
        "      { type: \"image_url\", image_url: { url: `data:" + mediaType + ";base64,${image}` } },\n" +
        "      { type: \"text\", text: " + JSON.stringify(q) + " },\n" +
        "    ] },\n  ],\n});\n" +
        "for await (const chunk of stream) {\n" +
        "  process.stdout.write(chunk.choices[0]?.delta?.content ?? \"\");\n}\n";
    }
    $("pg-code").textContent = code;
  }
  document.querySelectorAll(".tabs [data-lang]").forEach(function (tab) {
    tab.addEventListener("click", function () {
      codeLang = tab.getAttribute("data-lang");
      document.querySelectorAll(".tabs [data-lang]").forEach(function (other) {
        other.setAttribute("aria-selected", other === tab ? "true" : "false");
      });
      renderCode();
    });
  });
  [question, system, modelSelect, maxTokens, temperature, thinking].forEach(function (el) {
    el.addEventListener("input", renderCode);
    el.addEventListener("change", renderCode);
  });
  renderCode();
  window.playground = { takeFile: takeFile };
})();
