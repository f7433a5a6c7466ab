// Package halflife is a thin Go client for Halflife's gRPC API.
//
// The generated stubs live in the halflifev1 package (protoc-gen-go and
// protoc-gen-go-grpc from protos/); this package adds a connection holding
// one client per service, plain-value helpers and rich-error decoding.
//
//	c, err := halflife.Dial(ctx, "127.0.0.1:50051")
//	defer c.Close()
//	vectors, err := c.Embed(ctx, []string{"trail running shoes"})
//	recs, err := c.Recommend.Recommend(ctx, &halflifev1.RecommendRequest{UserId: "ana", Limit: 10})
package halflife

import (
	"context"
	"errors"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
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

// Dial connects to address ("host:port"), with MaxMessageBytes both ways.
// Without options the connection is plaintext (h2c), as `halflife serve`
// listens; options replace that default, so a plaintext connection with
// options (grpc.WithBlock(), ...) needs grpc.WithTransportCredentials(
// insecure.NewCredentials()) among them.
func Dial(ctx context.Context, address string, opts ...grpc.DialOption) (*Client, error) {
	if len(opts) == 0 {
		opts = []grpc.DialOption{grpc.WithInsecure()}
	}
	limits := grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageBytes), grpc.MaxCallSendMsgSize(MaxMessageBytes))
	conn, err := grpc.DialContext(ctx, address, append([]grpc.DialOption{limits}, opts...)...)
	if err != nil {
		return nil, err
	}
	return NewClient(conn), nil
}

// NewClient wraps an existing connection; Close closes it.
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

// Embed returns one unit-length embedding per text (1 to 256 texts).
func (c *Client) Embed(ctx context.Context, texts []string) ([][]float32, error) {
	resp, err := c.Embedding.Embed(ctx, &halflifev1.EmbedRequest{Inputs: texts})
	if err != nil {
		return nil, err
	}
	out := make([][]float32, len(resp.Embeddings))
	for i, e := range resp.Embeddings {
		out[i] = e.Values
	}
	return out, nil
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
