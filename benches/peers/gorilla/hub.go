// The hub: one goroutine owns every room (topic -> set of clients). Clients join and
// leave through the register and unregister channels, and every published message goes
// through the broadcast channel. A client whose send queue is full (by message count or
// by bytes) is dropped on the spot: the hub closes its send channel and forgets it, and the
// client's writePump notices and hangs up.

package main

import "github.com/gorilla/websocket"

// outbound is one message, framed once and shared by every subscriber it goes to.
type outbound struct {
	frame *websocket.PreparedMessage
	cost  int64 // payload plus frame header, counted against the send budget
}

type publication struct {
	topic string
	msg   *outbound
}

type Hub struct {
	rooms      map[string]map[*Client]struct{}
	register   chan *Client
	unregister chan *Client
	broadcast  chan publication
}

func newHub() *Hub {
	return &Hub{
		rooms:      make(map[string]map[*Client]struct{}),
		register:   make(chan *Client),
		unregister: make(chan *Client),
		broadcast:  make(chan publication, 256),
	}
}

func (h *Hub) run() {
	for {
		select {
		case c := <-h.register:
			for _, t := range c.topics {
				room := h.rooms[t]
				if room == nil {
					room = make(map[*Client]struct{})
					h.rooms[t] = room
				}
				room[c] = struct{}{}
			}
		case c := <-h.unregister:
			h.forget(c)
		case p := <-h.broadcast:
			for c := range h.rooms[p.topic] {
				if !c.offer(p.msg) {
					h.forget(c) // slow consumer: over its budget or its queue is full
				}
			}
		}
	}
}

// forget removes c from its rooms and closes its send channel, once.
func (h *Hub) forget(c *Client) {
	if c.gone {
		return
	}
	c.gone = true
	for _, t := range c.topics {
		if room := h.rooms[t]; room != nil {
			delete(room, c)
			if len(room) == 0 {
				delete(h.rooms, t)
			}
		}
	}
	close(c.send)
}
