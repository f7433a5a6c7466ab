module github.com/halflife/halflife/clients/go

go 1.19

// The oldest versions the generated code needs, the ones Debian 12 packages
// (golang-google-grpc-dev, golang-google-protobuf-dev, golang-google-genproto-dev):
// test.sh builds against those offline in GOPATH mode, or resolves these
// through the module proxy (go.sum is written by `go mod tidy` there).
require (
	github.com/golang/protobuf v1.5.2
	google.golang.org/genproto v0.0.0-20200526211855-cb27e3aa2013
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)
