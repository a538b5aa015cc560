module github.com/libbeit/beit-go

go 1.22
