// Package halflife is a thin Go client for Halflife's gRPC API.
//
// The generated stubs live in the halflifev1 package (protoc-gen-go and
// protoc-gen-go-grpc from protos/); this package adds a connection holding
// one client per service, plain-value helpers and rich-error decoding.
//
//	c, err := halflife.Dial(ctx, "127.0.0.1:50051")
//	if err != nil {
//		return err
//	}
//	defer c.Close()
//	vectors, err := c.Embed(ctx, []string{"trail running shoes"})
//	if err != nil {
//		return err
//	}
//	recs, err := c.Recommend.Recommend(ctx, &halflifev1.RecommendRequest{UserId: "ana", Limit: 10})
//	if err != nil {
//		return err
//	}
//	fmt.Println(len(vectors[0]), recs.Items)
package halflife

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/halflife/halflife/clients/go/halflifev1"
)

// Client is a connection to one Halflife server, with a client per service.
// It is safe for concurrent use.
type Client struct {
	conn      *grpc.ClientConn
	Embedding halflifev1.EmbeddingServiceClient
	Catalog   halflifev1.CatalogServiceClient
	Interest  halflifev1.InterestServiceClient
	Recommend halflifev1.RecommendServiceClient
}

// MaxMessageBytes is the largest message the server takes or sends (64 MiB);
// gRPC-Go's own receive limit, 4 MiB, fails a large GetItems.
const MaxMessageBytes = 64 << 20

// DefaultTimeout is the deadline Dial's connection gives a call whose context
// has none, as the Python client does: a call to a server that never answers
// fails instead of waiting forever. Dial reads it once: a change applies to
// connections dialled after it, never to calls already running (so changing it
// is no data race with them). Zero or less means no default deadline.
var DefaultTimeout = 10 * time.Second

// RetryAttempts is how many times in all Dial's connection tries a call that
// fails UNAVAILABLE (a connection dropped, a server starting or restarting) or
// that a server shutting down answers CANCELLED (calls it had not started:
// grpc/grpc#41785), and a RecordEvents that fails ABORTED (items its events
// name changed under each of the server's tries: nothing was recorded), with
// jittered backoff from 100 ms, doubling (0-100, 0-200, 0-400 ms: at most
// 0.7 s of waiting, for a blip, not a restart, which the caller retries).
// Every Halflife call is safe to repeat; no other status is retried (nor
// another call's ABORTED), and neither is a cancel or deadline of the caller's own
// (one that comes during a backoff ends the call CANCELLED or DEADLINE_EXCEEDED)
// nor a call on a closed connection.
// As the Python client does.
const RetryAttempts = 4

// DefaultPort is `halflife serve`'s port, which Dial gives an address without one.
const DefaultPort = 50051

// ServerTarget is address as Dial passes it to gRPC: a host with no port
// ("localhost", "10.0.0.7", "[::1]") or an empty one ("localhost:") gets
// DefaultPort, where gRPC would go to 443, as the CLI's --target and the
// Python client do; one with a port or a scheme of gRPC's ("unix:/path",
// "dns:///host:port": grpcSchemes) is kept. It is an error for an empty
// address or host (":50051"), an http(s):// URL, a port that is no number in
// 1-65535, and an IPv6 address or a host with a colon out of brackets ("::1",
// "2001:db8::1:50051", "h:1:2": an IPv6 address's last group would pass for a
// port; write "[::1]"). gRPC took a URL or "localhost:abc" for a host and
// failed only at the first call.
func ServerTarget(address string) (string, error) {
	address = strings.TrimSpace(address)
	if address == "" {
		return "", errors.New("halflife: address must be host:port, got an empty string")
	}
	// A control character went on to gRPC, which failed it only at the first call ("Misformatted domain
	// name"), after every retry; so did bytes that are no UTF-8. As the Python client refuses them (a review).
	if !utf8.ValidString(address) {
		return "", fmt.Errorf("halflife: address must be host:port, got %q: an address is UTF-8 text", address)
	}
	if i := strings.IndexFunc(address, func(r rune) bool { return !unicode.IsPrint(r) }); i >= 0 {
		stray, _ := utf8.DecodeRuneInString(address[i:])
		return "", fmt.Errorf("halflife: address must be host:port, got %q: an address holds no %q", address, stray)
	}
	if lower := strings.ToLower(address); strings.HasPrefix(lower, "http://") || strings.HasPrefix(lower, "https://") {
		// Refused, not stripped: an https:// address would be dialled in plaintext all the same (TLS is a DialOption).
		return "", fmt.Errorf("halflife: give host:port, not a URL: drop the %s", address[:strings.Index(address, "//")+2])
	}
	if ip, err := netip.ParseAddr(address); err == nil && ip.Is6() {
		return "", fmt.Errorf("halflife: an IPv6 address goes in brackets: [%s]:port", address)
	}
	// gRPC reads a scheme in any case ("DNS:///..."), as the Python client does.
	scheme := strings.Contains(address, ":") && grpcSchemes[strings.ToLower(address[:strings.Index(address, ":")])]
	host, port := strings.TrimSuffix(address, ":"), ""
	if strings.Contains(host, ":") && !bracketed(host) {
		host, port = address[:strings.LastIndex(address, ":")], address[strings.LastIndex(address, ":")+1:]
	}
	// An IPv6 address with a port ("2001:db8::1:50051"), a second colon ("h:1:2") or no host (":50051")
	// went on to gRPC, which failed them only at the first call (an audit).
	if !scheme && (host == "" || host == "[]") {
		return "", fmt.Errorf("halflife: no host: give host:port, got %q", address)
	}
	// A path, query, user or space after or in the host ("localhost/x", "user@h") went on to gRPC, which failed
	// it only at the first call, UNAVAILABLE after every retry (a review; the Python and Node clients refuse it too).
	if i := strings.IndexFunc(host, func(r rune) bool { return strings.ContainsRune(`/?#\@`, r) || unicode.IsSpace(r) }); !scheme && i >= 0 {
		stray, _ := utf8.DecodeRuneInString(host[i:])
		return "", fmt.Errorf("halflife: address must be host:port, got %q: a host holds no %q", address, stray)
	}
	// Before the default port is added: "h:1:" and "::1:" became "h:1:50051" and "::1:50051" (a review).
	if !scheme && strings.Contains(host, ":") && !bracketed(host) {
		if ip, err := netip.ParseAddr(host); err == nil && ip.Is6() {
			shown := port
			if shown == "" {
				shown = "port"
			}
			return "", fmt.Errorf("halflife: an IPv6 address goes in brackets: [%s]:%s", host, shown)
		}
		return "", fmt.Errorf("halflife: address must be host:port (an IPv6 host in brackets), got %q", address)
	}
	if port == "" {
		return host + ":" + strconv.Itoa(DefaultPort), nil
	}
	// A port is digits, signed or not (Atoi's syntax), as the Python client takes one: "-1" is out of range.
	// Only a scheme of gRPC's may end in no port ("unix:/run/halflife.sock").
	valid := scheme
	if n, err := strconv.Atoi(port); err == nil || errors.Is(err, strconv.ErrRange) {
		valid = n >= 1 && n <= 65535
	}
	if !valid {
		return "", fmt.Errorf("halflife: port must be 1 to 65535, got %s", port)
	}
	if !scheme { // the port as gRPC parses one: "+80" and "080" failed only at the first call (a review)
		n, _ := strconv.Atoi(port)
		return host + ":" + strconv.Itoa(n), nil
	}
	return address, nil
}

func bracketed(host string) bool { return strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") }

// The schemes of gRPC's name resolvers (grpc/doc/naming.md, xDS's, and
// gRPC-Go's default passthrough): an address that starts with one is gRPC's
// to parse, any other is host[:port]. The Python client holds the same set.
var grpcSchemes = map[string]bool{
	"dns": true, "ipv4": true, "ipv6": true, "unix": true, "unix-abstract": true, "vsock": true, "xds": true,
	"passthrough": true,
}

// Dial sets up a connection to address ("host:port"; a host alone gets
// DefaultPort: see ServerTarget, whose error Dial returns before connecting),
// with MaxMessageBytes both ways, DefaultTimeout and RetryAttempts, and
// refuses unsent a request with a string that is not valid UTF-8
// (INVALID_ARGUMENT, its FieldViolations naming the fields); a nil request
// is the empty one. It does
// not wait for the server: gRPC connects in the background, and the first
// call waits for it (within that call's deadline), unless grpc.WithBlock() is
// among the options. Without options the connection is plaintext (h2c), as
// `halflife serve` listens; options replace that default, so a plaintext
// connection with options needs grpc.WithInsecure() among them (or, from
// gRPC-Go 1.34 on, grpc.WithTransportCredentials(insecure.NewCredentials())).
//
// An interceptor of the caller's runs where its option puts it:
// grpc.WithChainUnaryInterceptor (recommended) runs it once per try, inside
// the retries and with the default deadline; grpc.WithUnaryInterceptor runs it
// once per call, outside the retries and before the default deadline is set.
func Dial(ctx context.Context, address string, opts ...grpc.DialOption) (*Client, error) {
	target, err := ServerTarget(address)
	if err != nil {
		return nil, err
	}
	if len(opts) == 0 {
		opts = []grpc.DialOption{grpc.WithInsecure()}
	}
	defaults := []grpc.DialOption{
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageBytes), grpc.MaxCallSendMsgSize(MaxMessageBytes)),
		grpc.WithChainUnaryInterceptor(checkRequest, deadlineAndRetries(DefaultTimeout)),
		// gRPC waits up to 120 s between reconnection attempts: calls to a server back up after a
		// restart failed UNAVAILABLE at once, without trying, for as long as the wait had grown.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: time.Second, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 2 * time.Second},
			MinConnectTimeout: 20 * time.Second,
		}),
	}
	conn, err := grpc.DialContext(ctx, target, append(defaults, opts...)...)
	if err != nil {
		return nil, err
	}
	return NewClient(conn), nil
}

// checkRequest sends a nil request as the empty one, as EachItem and
// EachEvent take nil (gRPC failed it INTERNAL, "proto: Marshal called with
// nil"), and fails a request that holds a string that is not valid UTF-8, at
// any depth, INVALID_ARGUMENT with a google.rpc.BadRequest naming each such
// field: protobuf-go refuses to marshal one (proto3's strings are UTF-8), so
// it is never sent, but gRPC reported that INTERNAL ("grpc: error while
// marshaling: string field contains invalid UTF-8"), naming no field. The
// strings are looked at only then, at no cost to the calls that marshal. Go
// strings hold any bytes; the Python and Node clients refuse such a string too.
func checkRequest(ctx context.Context, method string, req, reply interface{}, cc *grpc.ClientConn,
	invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	m, ok := req.(proto.Message)
	if ok && !m.ProtoReflect().IsValid() { // a nil pointer of the request's type
		req = m.ProtoReflect().Type().New().Interface()
	}
	err := invoker(ctx, method, req, reply, cc, opts...)
	if !ok || status.Code(err) != codes.Internal {
		return err
	}
	bad := invalidUTF8(m.ProtoReflect(), "")
	if len(bad) == 0 {
		return err
	}
	message := "halflife: " + bad[0].Field + ": " + bad[0].Description
	if len(bad) > 1 {
		message += fmt.Sprintf(" (and %d more)", len(bad)-1) // as the server words its own
	}
	if s, detailed := status.New(codes.InvalidArgument, message).WithDetails(
		&errdetails.BadRequest{FieldViolations: bad}); detailed == nil {
		return s.Err()
	}
	return status.Error(codes.InvalidArgument, message)
}

// invalidUTF8 lists the strings of m that are not valid UTF-8, named as the
// server names fields (prefix "events[0]." for an event of a request):
// fields in their order in the .proto, map keys sorted.
func invalidUTF8(m protoreflect.Message, prefix string) (bad []*errdetails.BadRequest_FieldViolation) {
	check := func(field, value, what string) {
		if utf8.ValidString(value) {
			return
		}
		for i, r := range value {
			if r == utf8.RuneError {
				if _, size := utf8.DecodeRuneInString(value[i:]); size == 1 {
					bad = append(bad, &errdetails.BadRequest_FieldViolation{Field: field, Description: fmt.Sprintf(
						"%s valid UTF-8 text, not a string with the byte 0x%02x at %d", what, value[i], i)})
					return
				}
			}
		}
	}
	one := func(field string, fd protoreflect.FieldDescriptor, v protoreflect.Value, what string) {
		switch fd.Kind() {
		case protoreflect.StringKind:
			check(field, v.String(), what)
		case protoreflect.MessageKind, protoreflect.GroupKind:
			bad = append(bad, invalidUTF8(v.Message(), field+".")...)
		}
	}
	fields := m.Descriptor().Fields()
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		if !m.Has(fd) {
			continue
		}
		name := prefix + string(fd.Name())
		switch {
		case fd.IsList():
			list := m.Get(fd).List()
			for j := 0; j < list.Len(); j++ {
				one(fmt.Sprintf("%s[%d]", name, j), fd, list.Get(j), "must be")
			}
		case fd.IsMap():
			entries := m.Get(fd).Map()
			var keys []protoreflect.MapKey
			entries.Range(func(k protoreflect.MapKey, _ protoreflect.Value) bool { keys = append(keys, k); return true })
			sort.Slice(keys, func(a, b int) bool { return keys[a].String() < keys[b].String() })
			for _, k := range keys {
				if fd.MapKey().Kind() == protoreflect.StringKind {
					check(name, k.String(), "keys must be")
				}
				one(fmt.Sprintf("%s[%q]", name, k.String()), fd.MapValue(), entries.Get(k), "must be")
			}
		default:
			one(name, fd, m.Get(fd), "must be")
		}
	}
	return bad
}

// deadlineAndRetries gives a call timeout (when above zero) if its context has
// no deadline, and tries it again as RetryAttempts says.
func deadlineAndRetries(timeout time.Duration) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply interface{}, cc *grpc.ClientConn,
		invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if _, ok := ctx.Deadline(); !ok && timeout > 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, timeout)
			defer cancel()
		}
		backoff := 100 * time.Millisecond
		for attempt := 1; ; attempt++ {
			err := invoker(ctx, method, req, reply, cc, opts...)
			code := status.Code(err)
			if code == codes.Unavailable && cc.GetState() == connectivity.Shutdown {
				// Close ended a call in flight ("transport is closing"): the caller's own doing, Canceled as
				// the Python and Node clients report it, not an Unavailable that says "retry" (a review).
				return status.Error(codes.Canceled, "halflife: the client was closed: "+status.Convert(err).Message())
			}
			if attempt == RetryAttempts || !retryable(method, code) || ctx.Err() != nil {
				return err // ctx.Err(): the caller's own cancel or deadline, not the server's
			}
			// Closed by Close: CANCELLED too, but no retry can succeed.
			if errors.Is(err, grpc.ErrClientConnClosing) || cc.GetState() == connectivity.Shutdown {
				return err
			}
			select {
			case <-ctx.Done(): // the caller's cancel or deadline came first: theirs is the outcome
				return status.FromContextError(ctx.Err()).Err()
			case <-time.After(backoffJitter(backoff)):
			}
			backoff *= 2
		}
	}
}

// retryable says whether a try of method that failed with code is tried again
// (see RetryAttempts). ABORTED is RecordEvents' "nothing was recorded, resend";
// elsewhere it can mean a conflict to redo at a higher level (AIP-194).
func retryable(method string, code codes.Code) bool {
	switch code {
	case codes.Unavailable, codes.Canceled:
		return true
	case codes.Aborted:
		return method == "/halflife.v1.InterestService/RecordEvents"
	}
	return false
}

// jitterRand is this package's own source, seeded from the clock: Go 1.19
// seeds the global one with 1, so every process would retry at the same moments.
var (
	jitterMu   sync.Mutex
	jitterRand = rand.New(rand.NewSource(time.Now().UnixNano()))
)

// backoffJitter draws the wait before a retry: gRPC's jitter, 0 to the
// backoff. A variable so that a test can make the wait outlast a deadline.
var backoffJitter = func(backoff time.Duration) time.Duration {
	jitterMu.Lock() // a rand.Rand is not safe for concurrent use
	defer jitterMu.Unlock()
	return time.Duration(jitterRand.Int63n(int64(backoff)))
}

// NewClient wraps an existing connection; Close closes it. (The connection's
// own options apply: Dial's deadline and retries only where it has them.)
func NewClient(conn *grpc.ClientConn) *Client {
	return &Client{
		conn:      conn,
		Embedding: halflifev1.NewEmbeddingServiceClient(conn),
		Catalog:   halflifev1.NewCatalogServiceClient(conn),
		Interest:  halflifev1.NewInterestServiceClient(conn),
		Recommend: halflifev1.NewRecommendServiceClient(conn),
	}
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Conn is the connection, for other services on it (grpc_health_v1's health
// checks, for one).
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// EmbedOption changes Embed's request.
type EmbedOption func(*halflifev1.EmbedRequest)

// Truncate cuts a text longer than the model's max input tokens to that
// length; without it, Embed fails INVALID_ARGUMENT on such a text.
func Truncate() EmbedOption {
	return func(r *halflifev1.EmbedRequest) { r.Truncate = true }
}

// SkipNormalize returns the model's pooled vectors as they are, not scaled to
// unit length (the Python client's normalize=False, Node's skipNormalize).
func SkipNormalize() EmbedOption {
	return func(r *halflifev1.EmbedRequest) { r.SkipNormalize = true }
}

// Embed returns one embedding per text (1 to 256 texts): unit length unless
// SkipNormalize is given.
func (c *Client) Embed(ctx context.Context, texts []string, opts ...EmbedOption) ([][]float32, error) {
	req := &halflifev1.EmbedRequest{Inputs: texts}
	for _, opt := range opts {
		opt(req)
	}
	resp, err := c.Embedding.Embed(ctx, req)
	if err != nil {
		return nil, err
	}
	out := make([][]float32, len(resp.Embeddings))
	for i, e := range resp.Embeddings {
		out[i] = e.Values
	}
	return out, nil
}

// MaxPageSize is the largest page the List RPCs return (ListItems,
// ListEvents), the page EachItem and EachEvent ask for unless told.
const MaxPageSize = 1000

// ErrServerTooOld is returned where the server answered without a field the
// call asked for: it predates the field (upgrade it), and its answer differs
// from the one asked for (ListEvents' newest_first: the events oldest first).
var ErrServerTooOld = errors.New("halflife: the server predates a field this call asked for")

// EachItem calls fn with every item of the catalogue, in order of id, a
// ListItems page at a time, and stops at fn's first error, which it returns.
// req (nil: the defaults) sets include_vectors and the page size (0:
// MaxPageSize); a page token in it is where to start. Items written while it
// pages come or not as their ids fall after the page read or before it.
func (c *Client) EachItem(ctx context.Context, req *halflifev1.ListItemsRequest, fn func(*halflifev1.Item) error) error {
	page := &halflifev1.ListItemsRequest{}
	if req != nil {
		page = proto.Clone(req).(*halflifev1.ListItemsRequest)
	}
	if page.PageSize == 0 {
		page.PageSize = MaxPageSize
	}
	return eachPage(page.PageToken, func(token string) ([]*halflifev1.Item, string, error) {
		page.PageToken = token
		resp, err := c.Catalog.ListItems(ctx, page)
		if err != nil {
			return nil, "", err
		}
		return resp.Items, resp.NextPageToken, nil
	}, fn)
}

// EachEvent calls fn with every event stored for req's user, in the order
// recorded (req.NewestFirst: the last recorded first), a ListEvents page at a
// time, and stops at fn's first error, which it returns. The page size and
// token are as EachItem's; req.StartTime and req.EndTime keep a time range.
// A server from before newest_first lists the events oldest first, one from
// before start_time and end_time the events of every time: EachEvent
// returns ErrServerTooOld then, before fn sees any of them.
func (c *Client) EachEvent(ctx context.Context, req *halflifev1.ListEventsRequest, fn func(*halflifev1.Event) error) error {
	page := &halflifev1.ListEventsRequest{} // nil: no user, which the server refuses
	if req != nil {
		page = proto.Clone(req).(*halflifev1.ListEventsRequest)
	}
	if page.PageSize == 0 {
		page.PageSize = MaxPageSize
	}
	return eachPage(page.PageToken, func(token string) ([]*halflifev1.Event, string, error) {
		page.PageToken = token
		resp, err := c.Interest.ListEvents(ctx, page)
		if err != nil {
			return nil, "", err
		}
		if page.NewestFirst && !resp.NewestFirst ||
			page.StartTime != nil && resp.StartTime == nil || page.EndTime != nil && resp.EndTime == nil {
			return nil, "", ErrServerTooOld
		}
		return resp.Events, resp.NextPageToken, nil
	}, fn)
}

// eachPage calls fn with each entry of the pages that next reads from token
// on, until a page's next token is "" or an error.
func eachPage[T any](token string, next func(token string) ([]T, string, error), fn func(T) error) error {
	for {
		entries, following, err := next(token)
		if err != nil {
			return err
		}
		for _, entry := range entries {
			if err := fn(entry); err != nil {
				return err
			}
		}
		if following == "" {
			return nil
		}
		token = following
	}
}

// Time converts a time.Time to the API's Timestamp; the zero time gives nil
// (unset: "now" or "unknown", as each field documents).
func Time(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

// FieldViolation is one entry of a google.rpc.BadRequest error detail.
type FieldViolation struct {
	Field       string // e.g. "events[3].item_id"
	Description string
}

// FieldViolations lists the google.rpc.BadRequest field violations that a
// failed call's status carries (INVALID_ARGUMENT, NOT_FOUND); nil when none.
func FieldViolations(err error) []FieldViolation {
	if err == nil {
		return nil
	}
	var withStatus interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &withStatus) {
		return nil
	}
	var out []FieldViolation
	for _, detail := range withStatus.GRPCStatus().Details() {
		if bad, ok := detail.(*errdetails.BadRequest); ok {
			for _, v := range bad.GetFieldViolations() {
				out = append(out, FieldViolation{Field: v.GetField(), Description: v.GetDescription()})
			}
		}
	}
	return out
}
