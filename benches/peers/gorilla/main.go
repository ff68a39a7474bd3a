// The gorilla/websocket peer for the shardcast comparison: a hub with per-topic rooms in the
// style of gorilla's chat example. Usage: gorilla-peer PORT (or PORT in the environment).
//
//	GET  /ws/{topic}, /ws?topic=T, /?topic=T   WebSocket: subscribe; messages sent are
//	                                            published to the topic (sender included)
//	POST /publish/{topic}                       publish the body; 202
//
// Listens on 127.0.0.1 only. GORILLA_SEND_SLOTS overrides the per-client queue length.

package main

import (
	"fmt"
	"io"
	"log"
	"mime"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"

	"github.com/gorilla/websocket"
)

var upgrader = websocket.Upgrader{
	ReadBufferSize:  1024,
	WriteBufferSize: 1024,
	CheckOrigin:     func(*http.Request) bool { return true },
}

func validTopic(t string) bool {
	if len(t) == 0 || len(t) > 128 {
		return false
	}
	for i := 0; i < len(t); i++ {
		b := t[i]
		ok := b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9' ||
			b == '.' || b == '_' || b == ':' || b == '-'
		if !ok {
			return false
		}
	}
	return true
}

// wsTopics returns the topics a WebSocket request asks for, or nil if it is not one.
func wsTopics(r *http.Request) []string {
	if strings.HasPrefix(r.URL.Path, "/ws/") {
		return []string{strings.TrimPrefix(r.URL.EscapedPath(), "/ws/")}
	}
	if r.URL.Path == "/" || r.URL.Path == "/ws" {
		seen := map[string]bool{}
		var topics []string
		for _, t := range r.URL.Query()["topic"] {
			if !seen[t] {
				seen[t] = true
				topics = append(topics, t)
			}
		}
		if topics == nil {
			return []string{""} // invalid: no topic
		}
		return topics
	}
	return nil
}

func serveWs(hub *Hub, w http.ResponseWriter, r *http.Request, topics []string) {
	for _, t := range topics {
		if !validTopic(t) {
			http.Error(w, "bad topic", http.StatusBadRequest)
			return
		}
	}
	conn, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return // Upgrade has answered the request
	}
	c := &Client{hub: hub, conn: conn, topics: topics, send: make(chan *outbound, sendSlots)}
	hub.register <- c
	go c.writePump()
	go c.readPump()
}

func servePublish(hub *Hub, w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", "POST")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	topic := strings.TrimPrefix(r.URL.EscapedPath(), "/publish/")
	if !validTopic(topic) {
		http.Error(w, "bad topic", http.StatusBadRequest)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxMessageSize))
	if err != nil {
		http.Error(w, "body too large", http.StatusRequestEntityTooLarge)
		return
	}
	kind := websocket.BinaryMessage
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err == nil {
		if strings.HasPrefix(mt, "text/") || mt == "application/json" {
			kind = websocket.TextMessage
		}
	}
	frame, err := websocket.NewPreparedMessage(kind, body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	hub.broadcast <- publication{topic, &outbound{frame, frameCost(len(body))}}
	w.WriteHeader(http.StatusAccepted)
}

func main() {
	port := os.Getenv("PORT")
	if len(os.Args) > 1 {
		port = os.Args[1]
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		fmt.Fprintln(os.Stderr, "usage: gorilla-peer PORT")
		os.Exit(2)
	}
	if s := os.Getenv("GORILLA_SEND_SLOTS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			fmt.Fprintln(os.Stderr, "GORILLA_SEND_SLOTS must be a positive integer")
			os.Exit(2)
		}
		sendSlots = n
	}

	hub := newHub()
	go hub.run()

	mux := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/publish/") {
			servePublish(hub, w, r)
			return
		}
		if r.URL.Path == "/healthz" {
			io.WriteString(w, "ok")
			return
		}
		if topics := wsTopics(r); topics != nil {
			serveWs(hub, w, r, topics)
			return
		}
		http.NotFound(w, r)
	})

	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", port))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("gorilla peer listening on ws://127.0.0.1:%s (send queue %d slots, 1 MiB)\n", port, sendSlots)
	log.Fatal(http.Serve(ln, mux))
}
